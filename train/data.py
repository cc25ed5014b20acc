"""Cache samples as training batches: a map-style dataset, length-bucketed token-budget batches, collation."""

import logging
import random

import numpy as np
import torch
from torch.utils.data import Dataset

from cache_schema import CacheReader

log = logging.getLogger(__name__)


class CacheDataset(Dataset):
    """Samples of the chosen shards of a cache; `positions` is the drafter's 1-D position source."""

    def __init__(self, reader: CacheReader, shards: list[str], position_source: str):
        if position_source not in ("mrope_axis0", "sequential"):
            raise ValueError(f"drafter.position_source={position_source!r}; choose mrope_axis0 or sequential")
        self.reader = reader
        self.position_source = position_source
        starts = self.reader.starts
        wanted = set(shards)
        self.index = [i for s, name in enumerate(self.reader.shards) if name in wanted
                      for i in range(int(starts[s]), int(starts[s + 1]))]
        all_lengths = self.reader.lengths()
        self.lengths = all_lengths[self.index] if self.index else np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict:
        return self.__getitems__([i])[0]

    def __getitems__(self, indices: list[int]) -> list[dict]:
        """A whole batch in one concurrent cache read (the DataLoader calls this with a batch's indices)."""
        ids = [self.index[i] for i in indices]
        items = []
        for sample_id, s in zip(ids, self.reader.read_samples(ids)):
            positions = s.position_ids[0] if self.position_source == "mrope_axis0" else np.arange(len(s))
            items.append({"sample_id": sample_id, "input_ids": torch.from_numpy(s.input_ids.astype(np.int64)),
                          "loss_mask": torch.from_numpy(s.loss_mask),
                          "positions": torch.from_numpy(positions.astype(np.int64)), "hidden": s.hidden_TLH})
        return items


def token_budget_batches(lengths: np.ndarray, max_tokens: int, max_length: int, bucket: int, seed: int,
                         epoch: int) -> tuple[list[list[int]], int]:
    """Shuffle, sort runs of `bucket` samples by length, pack each run greedily under the padded budget
    (longest x count <= max_tokens), then shuffle the batches. Deterministic for (seed, epoch).
    Returns (batches of dataset indices, number of samples skipped for exceeding max_length)."""
    rng = random.Random(seed * 10_007 + epoch)
    order = [i for i in range(len(lengths)) if lengths[i] <= max_length]
    skipped = len(lengths) - len(order)
    rng.shuffle(order)
    batches = []
    for start in range(0, len(order), bucket):
        run = sorted(order[start:start + bucket], key=lambda i: lengths[i])
        current, longest = [], 0
        for i in run:
            longest_if = max(longest, int(lengths[i]))
            if current and longest_if * (len(current) + 1) > max_tokens:
                batches.append(current)
                current, longest_if = [], int(lengths[i])
            current.append(i)
            longest = longest_if
        if current:
            batches.append(current)
    rng.shuffle(batches)
    return batches, skipped


# Padded lengths are rounded up to this multiple so that compiled flex-attention kernels see a bounded set of
# shapes instead of recompiling for every batch; padding changes no draw and no loss (see train/objective.py).
PAD_MULTIPLE = 64


def collate(items: list[dict]) -> dict:
    T = -(-max(len(x["input_ids"]) for x in items) // PAD_MULTIPLE) * PAD_MULTIPLE
    B = len(items)
    L, H = items[0]["hidden"].shape[1:]
    out = {"input_ids": torch.zeros(B, T, dtype=torch.long), "loss_mask": torch.zeros(B, T, dtype=torch.bool),
           "positions": torch.zeros(B, T, dtype=torch.long), "hidden": torch.zeros(B, T, L, H, dtype=torch.bfloat16),
           "lengths": torch.tensor([len(x["input_ids"]) for x in items]),
           "sample_ids": torch.tensor([x["sample_id"] for x in items])}
    for b, x in enumerate(items):
        n = len(x["input_ids"])
        for key in ("input_ids", "loss_mask", "positions", "hidden"):
            out[key][b, :n] = x[key]
    return out


def split_shards(reader: CacheReader, eval_shards: int) -> tuple[list[str], list[str]]:
    """Hold out the last `eval_shards` committed shards (none if the cache has only one shard)."""
    shards = reader.shards
    if not shards:
        raise ValueError(f"cache {reader.loc.url} has no committed shard")
    k = min(eval_shards, len(shards) - 1) if eval_shards > 0 else 0
    return shards[:len(shards) - k], shards[len(shards) - k:]


def epoch_batches(dataset: CacheDataset, cfg_data, seed: int, epoch: int) -> list[list[int]]:
    batches, skipped = token_budget_batches(dataset.lengths, cfg_data.max_tokens_per_batch, cfg_data.max_length,
                                            cfg_data.bucket_size, seed, epoch)
    if skipped and epoch == 0:
        log.warning("skipping %d samples longer than data.max_length=%d", skipped, cfg_data.max_length)
    if not batches:
        raise ValueError("no training batch: every sample exceeds data.max_length or the cache is empty")
    return batches

