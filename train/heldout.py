"""What training measures on the held-out shards of each cache at every evaluation: the objective's loss on fixed
batches, pooled, and tau replayed exactly (train/replay.py) on the first `eval_replay_samples` samples of each
cache, pooled over all verification cycles and per cache when there are several."""

import dataclasses
import math
from dataclasses import dataclass

import torch

from train.config import DrafterConfig, TrainConfig
from train.data import CacheDataset, batch_loader, epoch_batches
from train.metrics import add_sums, step_metrics
from train.objective import Objective
from train.replay import GreedyDrafter, replay_figures, replay_records


@dataclass
class HeldOut:
    """One cache's held-out samples: the batches its loss is measured on and the samples replayed."""

    name: str
    dataset: CacheDataset
    batches: list[list[int]]
    replayed: range


def held_out(named: list[tuple[str, CacheDataset]], cfg: TrainConfig) -> list[HeldOut]:
    """The evaluation sets of the caches that hold samples out. The replayed samples are the first ones, as
    `train.evaluate --max-samples N` replays them."""
    return [HeldOut(name, ds, epoch_batches(ds, cfg.data, cfg.seed, 0)[:cfg.eval_batches],
                    range(min(len(ds), cfg.eval_replay_samples))) for name, ds in named if len(ds)]


@torch.no_grad()
def evaluate(model, objective: Objective, sets: list[HeldOut], drafter: DrafterConfig, draft_ids, device,
             per_cache: bool) -> dict:
    """One metrics row: eval/loss and the objective's other figures pooled over every cache's batches, and
    eval/tau_replay (NaN when no cycle was replayed), with eval/tau_replay/NAME per cache if `per_cache`."""
    sums: dict = {}
    for s in sets:
        for batch in batch_loader(s.dataset, s.batches, num_workers=0):
            batch = {k: v.to(device) for k, v in batch.items()}
            # Fixed draws (step 0): evaluations compare across steps.
            add_sums(sums, objective.loss(model, batch, objective.blocks(batch, step=0))[1])
    row = {f"eval/{k}": v for k, v in step_metrics(sums).items()} if sums else {}
    drafting = GreedyDrafter.of(model, model.lm_head_VH, drafter.block_size, drafter.mask_token_id, draft_ids)
    row.update(replayed_tau(sets, drafting, "eval/tau_replay", per_cache))
    if model.selector is not None:  # DFlash2: what the selector adds over each slot's unary argmax
        row.update(replayed_tau(sets, dataclasses.replace(drafting, use_selector=False), "eval/tau_replay_unary",
                                per_cache))
    return row


def replayed_tau(sets: list[HeldOut], drafting: GreedyDrafter, name: str, per_cache: bool) -> dict:
    """{name: tau pooled over every cache's replayed cycles (NaN when none), name/CACHE: each cache's if asked}."""
    records = {s.name: replay_records(s.dataset, s.replayed, drafting) for s in sets if s.replayed}
    if not records:
        return {}

    def tau(recs):
        value = replay_figures(recs, drafting.block)["all"]["tau"]
        return math.nan if value is None else value

    out = {name: tau([r for recs in records.values() for r in recs])}
    if per_cache:
        out.update({f"{name}/{cache}": tau(recs) for cache, recs in records.items()})
    return out
