"""How long a run is and how its learning rate moves: steps from `optim.max_steps`, or from `optim.epochs` over
this training set, world size and token budget; linear warmup, then cosine decay to `optim.min_lr_ratio`."""

import math
from dataclasses import dataclass

from train.config import TrainConfig
from train.data import epoch_batches


@dataclass
class Schedule:
    total_steps: int
    warmup_steps: int
    min_lr_ratio: float
    batches_per_epoch: list[int]  # per process, of epochs 0, 1, ... (all of them when optim.epochs decides)

    def lr_lambda(self):
        """The learning-rate multiplier of each step, as LambdaLR takes it (a plain function: LambdaLR's state
        then holds no copy of it, and a resumed run rebuilds it from the config)."""
        warmup, total, low = self.warmup_steps, self.total_steps, self.min_lr_ratio

        def factor(step):
            if step < warmup:
                return (step + 1) / max(1, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return low + (1 - low) * 0.5 * (1 + math.cos(math.pi * progress))
        return factor


def rank_batches(dataset, cfg: TrainConfig, epoch: int, rank: int, world: int) -> list[list[int]]:
    """The batches process `rank` takes in `epoch`. Every rank takes the same number, so ranks step together and
    share one TrainState."""
    batches = epoch_batches(dataset, cfg.data, cfg.seed, epoch)
    per_rank = len(batches) // world
    if per_rank == 0:
        raise ValueError(f"{len(batches)} batches per epoch for {world} processes: lower data.max_tokens_per_batch "
                         "or add data")
    return batches[rank:per_rank * world:world]


def plan(dataset, cfg: TrainConfig, world: int) -> Schedule:
    """The schedule of a run on `dataset` (a `train.caches.MixedDataset`) over `world` processes."""
    o = cfg.optim
    epochs = o.epochs or 1
    per_epoch = [len(rank_batches(dataset, cfg, e, 0, world)) for e in range(epochs)]
    total = sum(per_epoch) // o.grad_accum if o.epochs else o.max_steps
    if total < 1:
        raise ValueError(f"optim.epochs={o.epochs} is {sum(per_epoch)} batches per process, less than one step of "
                         f"optim.grad_accum={o.grad_accum}")
    warmup = math.ceil(o.warmup_ratio * total) if o.warmup_ratio is not None else o.warmup_steps
    return Schedule(total_steps=total, warmup_steps=warmup, min_lr_ratio=o.min_lr_ratio, batches_per_epoch=per_epoch)


def describe(schedule: Schedule, cfg: TrainConfig, world: int) -> str:
    """The console line: what an epoch is here, how long the run is and which setting decided it."""
    o, first = cfg.optim, schedule.batches_per_epoch[0]
    epoch = (f"an epoch is {first} batches per process ({first / o.grad_accum:.4g} steps at optim.grad_accum="
             f"{o.grad_accum}) on {world} process{'es' if world > 1 else ''} at data.max_tokens_per_batch="
             f"{cfg.data.max_tokens_per_batch}")
    length = (f"optim.epochs={o.epochs}: {schedule.total_steps} steps (optim.max_steps ignored)" if o.epochs else
              f"optim.max_steps={o.max_steps}: {o.max_steps * o.grad_accum / first:.3g} epochs")
    warmup = (f"optim.warmup_ratio={o.warmup_ratio}" if o.warmup_ratio is not None else "optim.warmup_steps")
    return f"schedule: {epoch}; {length}; warmup {schedule.warmup_steps} steps ({warmup})"
