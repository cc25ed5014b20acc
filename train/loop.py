"""The training loop: one function, read top to bottom. Resumable state is `TrainState` plus the tensors."""

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from omegaconf import OmegaConf
from tqdm import tqdm

from cache_schema import CacheReader
from train import checkpoint
from train.checkpoint import TrainState
from train.drafter_from_cache import resolve_drafter
from train.config import DrafterConfig, TrainConfig, validate
from train.data import CacheDataset, batch_loader, epoch_batches, split_shards
from train.metrics import MetricLog
from train.model import Drafter
from train.objective import Objective, add_sums, draft_vocab, step_metrics
from train.replay import replay_tau

log = logging.getLogger("train")
REPLAY_SAMPLES = 16  # eval samples replayed at each evaluation: the exact tau at a bounded cost


def cosine_with_warmup(cfg):
    def factor(step):
        if step < cfg.warmup_steps:
            return (step + 1) / max(1, cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


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
        for batch in batch_loader(dataset, mine[state.cursor:], cfg.data.num_workers):
            state.cursor += 1
            yield batch
        state.epoch, state.cursor = state.epoch + 1, 0


@torch.no_grad()
def eval_loss(model, objective: Objective, dataset, batches: list[list[int]], device) -> dict:
    sums: dict = {}
    for batch in batch_loader(dataset, batches, num_workers=0):
        batch = {k: v.to(device) for k, v in batch.items()}
        # Fixed draws (step 0): evaluations compare across steps.
        add_sums(sums, objective.loss(model, batch, objective.blocks(batch, step=0))[1])
    return {f"eval/{k}": v for k, v in step_metrics(sums).items()}


def make_objective(cfg: TrainConfig, drafter: DrafterConfig, head_VH: torch.Tensor, draft_ids, device):
    backend = cfg.attention if cfg.attention != "auto" else ("flex" if device.type == "cuda" else "dense")
    return Objective(cfg.objective, block_size=drafter.block_size, mask_id=drafter.mask_token_id, head_VH=head_VH,
                     seed=cfg.seed, draft_ids=draft_ids, backend=backend)


def train(cfg: TrainConfig) -> TrainState:
    """Train (or resume) the run `cfg` describes; the caller's thread count and global RNG are left as they were."""
    validate(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg)
    finally:
        torch.set_num_threads(threads)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written before the cache is opened or anything is built."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir={str(run_dir)!r} cannot be written: {e.strerror or e}") from e


def _train(cfg: TrainConfig) -> TrainState:
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    cuda = torch.cuda.is_available()
    # The frozen embedding and head are identical on every rank: broadcasting them each forward (DDP's
    # default for buffers) would move a vocabulary-sized tensor per step for nothing.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)])
    device = accelerator.device

    # 1. Cache, compatibility, frozen target tensors.
    reader = CacheReader(cfg.data.cache)
    drafter = resolve_drafter(cfg, reader)
    cfg = dataclasses.replace(cfg, drafter=drafter)
    head = reader.head_tensors()
    train_shards, eval_shards = split_shards(reader, cfg.data.eval_shards)
    train_set = CacheDataset(reader, train_shards, drafter.position_source)
    eval_set = CacheDataset(reader, eval_shards, drafter.position_source)
    if accelerator.is_main_process:
        print(f"{reader.describe()}\ntraining on {len(train_shards)} shards ({len(train_set)} samples), evaluating "
              f"on {len(eval_shards)} ({len(eval_set)} samples)", flush=True)
    draft_ids = None
    if cfg.objective.draft_vocab_size:
        draft_ids = draft_vocab(torch.as_tensor(reader.token_frequencies()), cfg.objective.draft_vocab_size)

    # 2. Model (fp32 master weights, bf16 frozen head), optimiser, schedule, objective.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Drafter(drafter, head["embed_tokens"], head["lm_head"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_with_warmup(cfg.optim))
    state = TrainState()
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer, scheduler)
    if accelerator.is_main_process:
        print(f"resuming from {resume_from} at step {state.step}" if resume_from else
              f"starting fresh in {run_dir} (no checkpoint to resume)", flush=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core = accelerator.unwrap_model(model)
    objective = make_objective(cfg, drafter, core.lm_head_VH, draft_ids, device)
    eval_batches = epoch_batches(eval_set, cfg.data, cfg.seed, 0)[:cfg.eval_batches] if len(eval_set) else []
    replay_samples = sorted({i for b in eval_batches for i in b})[:REPLAY_SAMPLES]
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)

    def save():
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            path = checkpoint.save(run_dir, state, accelerator.get_state_dict(model), optimizer, scheduler,
                                   config_dict, cfg.keep_last, reader.manifest.to_dict(), draft_ids)
            log.info("saved %s", path)
        accelerator.wait_for_everyone()

    # 3. Steps. The loss is normalised by the weight of the whole step (all micro-batches, all ranks), so a
    # micro-batch with few supervised slots counts for what it holds, as one large batch would.
    metrics = MetricLog(run_dir, enabled=accelerator.is_main_process)
    stream = batch_stream(train_set, cfg, state, accelerator.process_index, accelerator.num_processes)
    bar = tqdm(total=cfg.optim.max_steps, initial=state.step, desc="train", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    while state.step < cfg.optim.max_steps:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(cfg.optim.grad_accum)]
        blocks = [objective.blocks(b, state.step * cfg.optim.grad_accum + i) for i, b in enumerate(micro)]
        step_weight = accelerator.reduce(sum(b.weights_BQ.sum() for b in blocks).detach(), "sum").clamp_min(1e-8)
        sums: dict = {}
        for i, (batch, blk) in enumerate(zip(micro, blocks)):
            last_micro = i + 1 == len(micro)
            with accelerator.autocast(), contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss_sum, stats = objective.loss(model, batch, blk)
                # DDP averages gradients over ranks; scaling by the world size makes that average a global sum.
                accelerator.backward(loss_sum * accelerator.num_processes / step_weight)
            add_sums(sums, stats)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
        else:  # one bad batch must not poison the weights; the step still counts so resume stays exact
            log.warning("step %d: non-finite gradient norm %s, optimizer step skipped", state.step + 1, grad_norm)
            sums["skipped_steps"] = torch.ones((), dtype=torch.float64)
        scheduler.step()
        state.step += 1
        state.tokens += int(sums["tokens"])
        metrics.add(sums, seconds=time.perf_counter() - started)
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.optim.max_steps:
            row = metrics.flush(state.step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{row['loss']:.3f}", tau_est=f"{row['acceptance_estimate']:.2f}",
                            sup_tok_s=f"{row['supervised_tokens_per_s']:.0f}")
        if cfg.eval_every and state.step % cfg.eval_every == 0 and eval_batches and accelerator.is_main_process:
            # Rank 0 alone evaluates, so it uses the unwrapped model, outside DDP's bookkeeping.
            evaluation = eval_loss(core, objective, eval_set, eval_batches, device)
            tau = replay_tau(core, core.lm_head_VH, eval_set, replay_samples, drafter.block_size,
                             drafter.mask_token_id, draft_ids)["all"]["tau"]
            metrics.write(state.step, {**evaluation, "eval/tau_replay": math.nan if tau is None else tau})
        if cfg.save_every and state.step % cfg.save_every == 0 and state.step < cfg.optim.max_steps:
            save()
    bar.close()
    save()  # the final checkpoint goes through the same path as periodic ones
    metrics.close()
    return state
