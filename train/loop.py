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
from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, broadcast_object_list
from omegaconf import OmegaConf
from tqdm import tqdm

from cache_schema.lock import DirectoryLock, held_by_main
from cache_schema.stop import StopSignals, Stopped
from train import checkpoint, schedule
from train.caches import check_audits, describe, open_caches, split
from train.checkpoint import Snapshot, TrainState
from train.config import DrafterConfig, TrainConfig, validate
from train.data import batch_loader
from train.drafter_from_cache import resolve_drafter
from train.heldout import evaluate, held_out
from train.metrics import JsonlTracker, MetricLog, add_sums, start_trackers
from train.model import Drafter
from train.objective import Objective, draft_vocab

log = logging.getLogger("train")


def batch_stream(dataset, cfg: TrainConfig, state: TrainState, rank: int, world: int):
    """Batches from the resume point on, across epochs; advances state.epoch/state.cursor as it goes."""
    while True:
        mine = schedule.rank_batches(dataset, cfg, state.epoch, rank, world)
        for batch in batch_loader(dataset, mine[state.cursor:], cfg.data.num_workers):
            state.cursor += 1
            yield batch
        state.epoch, state.cursor = state.epoch + 1, 0


def make_objective(cfg: TrainConfig, drafter: DrafterConfig, head_VH: torch.Tensor, draft_ids, device,
                   total_steps: int = 1):
    backend = cfg.attention if cfg.attention != "auto" else ("flex" if device.type == "cuda" else "dense")
    return Objective(cfg.objective, block_size=drafter.block_size, mask_id=drafter.mask_token_id, head_VH=head_VH,
                     seed=cfg.seed, draft_ids=draft_ids, backend=backend, total_steps=total_steps)


def train(cfg: TrainConfig) -> TrainState:
    """Train (or resume) the run `cfg` describes; the caller's thread count and global RNG are left as they were.
    SIGTERM or SIGINT ends it after the current step with a checkpoint there, raising `Stopped`."""
    validate(cfg)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with StopSignals() as stop, contextlib.ExitStack() as hold:
            return _train(cfg, stop, hold)
    finally:
        torch.set_num_threads(threads)


def stop_agreed(accelerator, stop: StopSignals, device) -> bool:
    """Whether any rank was asked to stop: every rank answers the same, so all stop after the same step."""
    asked = torch.tensor(float(stop.requested is not None), device=device)
    if accelerator.num_processes > 1:
        asked = accelerator.reduce(asked, "sum")
    return bool(asked > 0)


def check_run_dir(run_dir: Path) -> None:
    """Refuse a run directory that cannot be written before the cache is opened or anything is built."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"run_dir={str(run_dir)!r} cannot be written: {e.strerror or e}") from e


def _train(cfg: TrainConfig, stop: StopSignals, hold: contextlib.ExitStack) -> TrainState:
    run_dir = Path(cfg.run_dir)
    check_run_dir(run_dir)
    cuda = torch.cuda.is_available()
    # The frozen embedding and head are identical on every rank: broadcasting them each forward (DDP's
    # default for buffers) would move a vocabulary-sized tensor per step for nothing.
    accelerator = Accelerator(cpu=not cuda, mixed_precision="bf16" if cuda else "no",
                              kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
                              log_with=[JsonlTracker(run_dir), *cfg.log_with],
                              project_config=ProjectConfiguration(project_dir=str(run_dir),
                                                                  logging_dir=str(run_dir / "tensorboard")))
    device, world = accelerator.device, accelerator.num_processes
    # The run directory's lock, before anything is written into it.
    hold.enter_context(held_by_main(DirectoryLock(run_dir, "run_dir"), accelerator.is_main_process,
                                    lambda v: broadcast_object_list([v])[0] if world > 1 else v))

    # 1. Caches, compatibility, frozen target tensors, the run's length.
    sources = cfg.data.sources()
    readers = open_caches(sources)
    check_audits(sources, readers, cfg.data.accept_flagged_layers)
    drafter = resolve_drafter(cfg, readers[0])
    cfg = dataclasses.replace(cfg, drafter=drafter)
    head = readers[0].head_tensors()
    train_set, named_eval = split(sources, readers, cfg.data.eval_shards, drafter.position_source)
    plan = schedule.plan(train_set, cfg, world)
    data_lines, data_info = describe(sources, readers, train_set, named_eval, cfg.seed)
    if accelerator.is_main_process:
        print(f"{data_lines}\n{schedule.describe(plan, cfg, world)}", flush=True)
    draft_ids = None
    if cfg.objective.draft_vocab_size:
        freq = sum(s.weight * torch.as_tensor(r.token_frequencies(), dtype=torch.float64)
                   for s, r in zip(sources, readers))
        draft_ids = draft_vocab(freq, cfg.objective.draft_vocab_size)

    # 2. Model (fp32 master weights, bf16 frozen head), optimiser, schedule, objective.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = Drafter(drafter, head["embed_tokens"], head["lm_head"])
    if model.selector is not None and cfg.objective.selector_alpha == 0:
        model.selector.requires_grad_(False)  # weight 0 freezes the selector: it stays as initialised
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.optim.lr,
                                  betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, plan.lr_lambda())
    state = TrainState()
    resume_from = checkpoint.find_resume(run_dir, cfg.resume)
    if resume_from:
        state = checkpoint.load(resume_from, model, optimizer, scheduler)
    if accelerator.is_main_process:
        print(f"resuming from {resume_from} at step {state.step}" if resume_from else
              f"starting fresh in {run_dir} (no checkpoint to resume)", flush=True)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    core = accelerator.unwrap_model(model)
    objective = make_objective(cfg, drafter, core.lm_head_VH, draft_ids, device, plan.total_steps)
    eval_sets = held_out(named_eval, cfg)
    config_dict = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
    start_trackers(accelerator, cfg.tracker_project, run_dir,
                   {**config_dict, "caches": data_info,
                    "schedule": {"total_steps": plan.total_steps, "warmup_steps": plan.warmup_steps,
                                 "batches_per_epoch": plan.batches_per_epoch[0], "world_size": world}})

    def save(step_dir: bool, best: bool):
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            snap = Snapshot(state, accelerator.get_state_dict(model), optimizer, scheduler, config_dict,
                            readers[0].manifest.to_dict(), draft_ids)
            path = checkpoint.save(run_dir, snap, cfg.keep_last) if step_dir else None
            if best:
                checkpoint.save_best(run_dir, snap, linked_from=path)
            log.info("saved %s", " and ".join(str(p) for p in (path, run_dir / checkpoint.BEST if best else None) if p))
        accelerator.wait_for_everyone()

    def stopped() -> bool:
        return bool(cfg.early_stop_patience) and state.evals_since_best >= cfg.early_stop_patience

    # 3. Steps. The loss is normalised by the weight of the whole step (all micro-batches, all ranks), so a
    # micro-batch with few supervised slots counts for what it holds, as one large batch would. D-PACE's weights
    # exist only once the forward has run, so every micro-batch backpropagates its weighted sum and the summed
    # gradient is divided by the step's weight afterwards (the same gradient, by linearity).
    total = plan.total_steps
    metrics = MetricLog(accelerator)
    stream = batch_stream(train_set, cfg, state, accelerator.process_index, world)
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step",
               disable=not (cfg.progress and accelerator.is_main_process))
    stopping = False
    while state.step < total and not stopped() and not stopping:
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        micro = [{k: v.to(device) for k, v in next(stream).items()} for _ in range(cfg.optim.grad_accum)]
        sums: dict = {}
        for i, batch in enumerate(micro):
            blk = objective.blocks(batch, state.step * cfg.optim.grad_accum + i)
            last_micro = i + 1 == len(micro)
            with accelerator.autocast(), contextlib.nullcontext() if last_micro else accelerator.no_sync(model):
                loss_sum, stats = objective.loss(model, batch, blk, step=state.step)
                accelerator.backward(loss_sum)
            add_sums(sums, stats)
        # DDP averages gradients over ranks; scaling by the world size makes that average a global sum.
        step_weight = accelerator.reduce(sums["weight"].to(device, torch.float32), "sum").clamp_min(1e-8)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(world / step_weight)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        if torch.isfinite(grad_norm):
            optimizer.step()
            state.nonfinite_run = 0
        else:  # one bad batch must not poison the weights; the step still counts so resume stays exact
            log.warning("step %d: non-finite gradient norm %s, optimizer step skipped", state.step + 1, grad_norm)
            sums["skipped_steps"] = torch.ones((), dtype=torch.float64)
            state.nonfinite_run += 1
            if cfg.nonfinite_patience and state.nonfinite_run >= cfg.nonfinite_patience:
                raise ValueError(
                    f"{state.nonfinite_run} optimizer steps in a row (up to step {state.step + 1}) had a non-finite "
                    "gradient and were skipped: the drafter is not learning. Non-finite hidden states in the cache "
                    "(tools.inspect_cache --audit) or too high a learning rate are the usual causes; "
                    "nonfinite_patience=0 goes on regardless")
        scheduler.step()
        state.step += 1
        state.tokens += int(sums["tokens"])
        metrics.add(sums, seconds=time.perf_counter() - started)
        bar.update(1)
        if state.step % cfg.log_every == 0 or state.step == total:
            row = metrics.flush(state.step, lr=scheduler.get_last_lr()[0], grad_norm=float(grad_norm))
            bar.set_postfix(loss=f"{row['loss']:.3f}", tau_est=f"{row['acceptance_estimate']:.2f}",
                            sup_tok_s=f"{row['supervised_tokens_per_s']:.0f}")
        best = False
        if cfg.eval_every and eval_sets and (state.step % cfg.eval_every == 0 or state.step == total):
            # Rank 0 alone evaluates, with the unwrapped model outside DDP's bookkeeping; every rank learns its
            # tau, so all of them agree on the best checkpoint and on stopping early.
            row = (evaluate(core, objective, eval_sets, drafter, draft_ids, device, per_cache=len(sources) > 1)
                   if accelerator.is_main_process else {})
            metrics.write(state.step, row)
            tau = broadcast_object_list([row.get("eval/tau_replay", math.nan)])[0]
            if not math.isnan(tau):
                state.evaluations.append([state.step, tau])
                best = state.best[0] == state.step
        stopping = stop_agreed(accelerator, stop, device)
        if state.step < total and not stopped() and not stopping:
            periodic = bool(cfg.save_every) and state.step % cfg.save_every == 0
            if periodic or best:
                save(step_dir=periodic, best=best)
    bar.close()
    # The final checkpoint goes through the same path as periodic ones, a stop's too.
    save(step_dir=True, best=state.best is not None and state.best[0] == state.step)
    metrics.close()
    if stopping and state.step < total:
        raise Stopped(f"stopped by {stop.requested or 'another rank'} after step {state.step} of {total}; its "
                      f"checkpoint is saved in {run_dir}/checkpoints; the same command resumes from it")
    if accelerator.is_main_process and state.best:
        print(best_summary(state, run_dir, stopped()), flush=True)
    return state


def best_summary(state: TrainState, run_dir: Path, stopped_early: bool) -> str:
    (best_step, best_tau), (last_step, last_tau) = state.best, state.evaluations[-1]
    line = (f"stopped early at step {state.step}: {state.evals_since_best} evaluations without a better "
            "eval/tau_replay; " if stopped_early else "")
    line += f"best eval/tau_replay {best_tau:.4f} at step {best_step} ({run_dir}/best)"
    if best_step == last_step:
        return line + ", the last evaluation"
    if best_tau == last_tau:
        return line + f", equalled by the last evaluation (step {last_step})"
    return line + f" beats the last evaluation, step {last_step} ({last_tau:.4f}), by {best_tau - last_tau:.4f}"
