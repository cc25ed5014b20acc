"""The training loop: one function, read top to bottom. Resumable state is `TrainState` plus the tensors."""

import contextlib
import logging
import math
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from omegaconf import OmegaConf
from torch.utils.data import DataLoader
from tqdm import tqdm

from cache_schema import CacheReader
from train import checkpoint
from train.attention import build_mask
from train.blocks import block_metrics, chunked_loss, default_gamma, draft_vocab, make_blocks, sample_anchors, \
    sample_prefix
from train.checkpoint import TrainState
from train.compat import check_cache
from train.config import TrainConfig
from train.data import CacheDataset, collate, epoch_batches, split_shards
from train.metrics import MetricLog
from train.model import Drafter

log = logging.getLogger("train")


def cosine_with_warmup(cfg):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


class Objective:
    """Everything the loss needs beside the model: block size, mask id, gamma, the (draft) head, backend."""

    def __init__(self, cfg: TrainConfig, mask_id: int, token_freq, head_VH: torch.Tensor):
        self.cfg, self.mask_id = cfg, mask_id
        self.block = cfg.drafter.block_size
        self.gamma = cfg.objective.gamma or default_gamma(self.block)
        device = head_VH.device
        self.backend = cfg.attention if cfg.attention != "auto" else ("flex" if device.type == "cuda" else "dense")
        self.head_VH, self.t2d = head_VH, None
        if cfg.objective.draft_vocab_size:
            ids, t2d = draft_vocab(torch.as_tensor(token_freq), cfg.objective.draft_vocab_size)
            # The head is frozen, so the draft-vocabulary rows are gathered once, not at every step.
            self.head_VH, self.t2d = head_VH[ids.to(device)], t2d.to(device)

    def __call__(self, model, batch: dict, step: int):
        o = self.cfg.objective
        anchors, keep = sample_anchors(batch["loss_mask"], batch["lengths"], batch["sample_ids"], o.num_anchors,
                                       self.cfg.seed, step)
        prefix = sample_prefix(keep, batch["sample_ids"], self.cfg.seed, step, self.block, o.prefix_weight_base,
                               o.mode)
        blocks = make_blocks(batch["input_ids"], batch["positions"], batch["loss_mask"], batch["lengths"], anchors,
                             keep, prefix, self.block, self.mask_id, self.gamma)
        mask = build_mask(anchors, batch["lengths"], batch["input_ids"].shape[1], self.block, self.backend)
        h = model(batch["hidden"], batch["positions"], blocks.ids_BQ, blocks.pos_BQ, mask, self.backend)
        loss, correct = chunked_loss(h, self.head_VH, blocks.labels_BQ, blocks.weights_BQ, o.loss_chunk_rows, self.t2d)
        return loss, {"loss": loss.item(), **block_metrics(correct, blocks, self.block),
                      "tokens": int(batch["loss_mask"].sum())}


def batch_stream(dataset, cfg: TrainConfig, state: TrainState, rank: int, world: int):
    """Batches from the resume point on, across epochs; advances state.epoch/state.cursor as it goes."""
    while True:
        batches = epoch_batches(dataset, cfg.data, cfg.seed, state.epoch)
        # Every rank takes the same number of batches, so ranks step together and share one TrainState.
        per_rank = len(batches) // world
        if per_rank == 0:
            raise ValueError(f"{len(batches)} batches per epoch for {world} processes: lower "
                             "data.max_tokens_per_batch or add data")
        mine = batches[rank:per_rank * world:world]
        loader = DataLoader(dataset, batch_sampler=mine[state.cursor:], collate_fn=collate,
                            num_workers=cfg.data.num_workers, persistent_workers=False)
        for batch in loader:
            state.cursor += 1
            yield batch
        state.epoch, state.cursor = state.epoch + 1, 0


@torch.no_grad()
def evaluate(model, objective: Objective, dataset, batches: list[list[int]], device) -> dict:
    totals, weights = {}, 0
    for batch in DataLoader(dataset, batch_sampler=batches, collate_fn=collate, num_workers=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        _, m = objective(model, batch, step=0)  # fixed draws: evaluations compare across steps
        n = m.pop("tokens")
        for k, v in m.items():
            totals[k] = totals.get(k, 0.0) + v * n
        weights += n
    return {f"eval/{k}": v / max(weights, 1) for k, v in totals.items()}


def train(cfg: TrainConfig) -> TrainState:
    run_dir = Path(cfg.run_dir)
    cuda = torch.cuda.is_available()
    # The frozen embedding and head are identical on every rank: broadcasting them each forward (DDP's
    # default for buffers) would move a vocabulary-sized tensor per step for nothing.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                              fsdp_plugin=_fsdp_plugin() if cfg.distributed == "fsdp" else None)
    device = accelerator.device

    # 1. Cache, compatibility, frozen target tensors.
    reader = CacheReader(cfg.data.cache)
    mask_id = check_cache(cfg, reader)
    head = reader.head_tensors()
    train_shards, eval_shards = split_shards(reader, cfg.data.eval_shards)
    train_set = CacheDataset(reader, train_shards, cfg.drafter.position_source)
    eval_set = CacheDataset(reader, eval_shards, cfg.drafter.position_source)

    # 2. Model (fp32 master weights), optimiser, schedule, objective.
    torch.manual_seed(cfg.seed)
    model = Drafter(cfg.drafter, head["embed_tokens"].float(), head["lm_head"].float())
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.optim))
    state = TrainState()
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer, scheduler)
        log.info("resumed from %s at step %d", resume_from, state.step)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core = accelerator.unwrap_model(model)
    objective = Objective(cfg, mask_id, reader.token_frequencies(), core.lm_head_VH)
    eval_batches = epoch_batches(eval_set, cfg.data, cfg.seed, 0)[:cfg.eval_batches] if len(eval_set) else []
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def save():
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = checkpoint.save(run_dir, state, accelerator.get_state_dict(model), optimizer, scheduler,
                                   config_dict, cfg.keep_last)
            log.info("saved %s", path)
        accelerator.wait_for_everyone()

    # 3. Steps.
    metrics = MetricLog(run_dir, enabled=accelerator.is_main_process)
    stream = batch_stream(train_set, cfg, state, accelerator.process_index, accelerator.num_processes)
    bar = tqdm(total=cfg.optim.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    while state.step < cfg.optim.max_steps:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        step_logs = []
        for micro in range(cfg.optim.grad_accum):
            batch = {k: v.to(device) for k, v in next(stream).items()}
            last_micro = micro + 1 == cfg.optim.grad_accum
            with accelerator.autocast(), contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss, m = objective(model, batch, state.step * cfg.optim.grad_accum + micro)
                accelerator.backward(loss / cfg.optim.grad_accum)
            step_logs.append(m)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        state.step += 1
        tokens = sum(m["tokens"] for m in step_logs)
        state.tokens += tokens
        means = {k: sum(m[k] for m in step_logs if k in m) / len(step_logs) for k in step_logs[0] if k != "tokens"}
        metrics.add(means, tokens=tokens, seconds=time.perf_counter() - started)
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.optim.max_steps:
            row = metrics.flush(state.step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{row['loss']:.3f}", tau=f"{row['acceptance_estimate']:.2f}",
                            sup_tok_s=f"{row['supervised_tokens_per_s']:.0f}")
        if cfg.eval_every and state.step % cfg.eval_every == 0 and eval_batches and accelerator.is_main_process:
            # Rank 0 alone evaluates, so it uses the unwrapped model, outside DDP's bookkeeping.
            metrics.write(state.step, evaluate(core, objective, eval_set, eval_batches, device))
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.optim.max_steps:
            save()
    bar.close()
    save()  # the final checkpoint goes through the same path as periodic ones
    metrics.close()
    return state


def _fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(auto_wrap_policy="transformer_based_wrap",
                                          transformer_cls_names_to_wrap=["DecoderLayer"])

