"""Cache samples as training batches: a map-style dataset, length-bucketed token-budget batches, padded batches
read straight into their tensors and the DataLoader that delivers them."""

import logging
import math
import random
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from cache_schema import CacheReader
from train.config import POSITION_SOURCES, check_choice

log = logging.getLogger(__name__)


# Padded lengths are rounded up to this multiple so that compiled flex-attention kernels see a bounded set of
# shapes instead of recompiling for every batch; padding changes no draw and no loss (see train/objective.py).
PAD_MULTIPLE = 64


def padded_length(lengths) -> int:
    """The time axis of a batch holding samples of these lengths."""
    return -(-max(lengths) // PAD_MULTIPLE) * PAD_MULTIPLE


class CacheDataset(Dataset):
    """Samples of the chosen shards of a cache; `positions` is the drafter's 1-D position source."""

    def __init__(self, reader: CacheReader, shards: list[str], position_source: str):
        check_choice("drafter.position_source", position_source, POSITION_SOURCES)
        self.reader = reader
        self.shards = list(shards)
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
        """One sample, unpadded."""
        sample_id = self.index[i]
        s = self.reader[sample_id]
        return {"sample_id": sample_id, "input_ids": torch.from_numpy(s.input_ids.astype(np.int64)),
                "loss_mask": torch.from_numpy(s.loss_mask),
                "positions": torch.from_numpy(self.positions(s, sample_id)), "hidden": s.hidden_TLH}

    def positions(self, s, sample_id: int) -> np.ndarray:
        """The drafter's 1-D positions of sample `sample_id` of this cache; for `mixed`, either source, by a fixed
        hash of that id that splits the samples about evenly."""
        source = self.position_source
        if source == "mixed":
            source = POSITION_SOURCES[(sample_id * 2654435761 >> 16) & 1]
        return (s.position_ids[0] if source == "mrope_axis0" else np.arange(len(s))).astype(np.int64)

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        """The samples of one epoch: each once."""
        return np.arange(len(self))

    def batch(self, indices: list[int]) -> dict:
        """The samples at `indices` as one padded batch."""
        return padded_batch([(self, i) for i in indices], [self.index[i] for i in indices])


def padded_batch(picks: list[tuple[CacheDataset, int]], sample_ids: list[int]) -> dict:
    """The samples `picks` (dataset, index) as one padded batch: one concurrent read per cache, hidden states
    decoded straight into the batch tensor (no per-sample copy), zero padding. `sample_ids` key the batch's
    random draws (train/objective.py)."""
    lengths = [int(ds.lengths[i]) for ds, i in picks]
    T, B = padded_length(lengths), len(picks)
    manifest = picks[0][0].reader.manifest
    L, H = len(manifest.target_layer_ids), manifest.target.hidden_size
    hidden = _batch_tensor((B, T, L, H), torch.bfloat16)
    samples: list = [None] * B
    for ds in {id(ds): ds for ds, _ in picks}.values():
        rows = [b for b, (d, _) in enumerate(picks) if d is ds]
        read = ds.reader.read_samples([ds.index[picks[b][1]] for b in rows],
                                      hidden_into=[hidden[b, :lengths[b]] for b in rows])
        for b, s in zip(rows, read):
            samples[b] = s
    out = {"input_ids": torch.zeros(B, T, dtype=torch.long), "loss_mask": torch.zeros(B, T, dtype=torch.bool),
           "positions": torch.zeros(B, T, dtype=torch.long), "hidden": hidden,
           "lengths": torch.tensor(lengths), "sample_ids": torch.tensor(sample_ids)}
    for b, ((ds, _), s, n) in enumerate(zip(picks, samples, lengths)):
        out["input_ids"][b, :n] = torch.from_numpy(s.input_ids)
        out["loss_mask"][b, :n] = torch.from_numpy(s.loss_mask)
        out["positions"][b, :n] = torch.from_numpy(ds.positions(s, ds.index[picks[b][1]]))
        hidden[b, n:] = 0
    return out


def _batch_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised tensor; in a DataLoader worker, in shared memory, so that handing it to the main
    process copies nothing (torch's default collation does the same)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage).view(shape)


class PaddedBatches(Dataset):
    """A dataset's padded batches (its `batch`), one per list of indices: the dataset of `batch_loader`."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __getitem__(self, indices: list[int]) -> dict:
        return self.dataset.batch(indices)


def batch_loader(dataset, batches: list[list[int]], num_workers: int) -> DataLoader:
    """Padded batches in the order of `batches`; each is read and assembled whole in a worker (or in
    process with 0 workers) and arrives as is."""
    # Its own generator: the workers' base seed would otherwise be drawn from (and advance) the global RNG.
    return DataLoader(PaddedBatches(dataset), sampler=batches, batch_size=None, num_workers=num_workers,
                      persistent_workers=False, generator=torch.Generator().manual_seed(0),
                      worker_init_fn=_leave_stops_to_the_main_process)


def _leave_stops_to_the_main_process(worker_id: int) -> None:
    """A Ctrl-C reaches the whole process group: the workers ignore it (and SIGTERM), so that the main process can
    finish its step and save, as cache_schema/stop.py has it; they end with it."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


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


def split_shards(reader: CacheReader, eval_shards: int) -> tuple[list[str], list[str]]:
    """Hold out the last `eval_shards` committed shards (none if the cache has only one shard)."""
    shards = reader.shards
    if not shards:
        raise ValueError(f"cache {reader.loc.url} has no committed shard")
    k = min(eval_shards, len(shards) - 1) if eval_shards > 0 else 0
    return shards[:len(shards) - k], shards[len(shards) - k:]


def epoch_batches(dataset, cfg_data, seed: int, epoch: int) -> list[list[int]]:
    """Token-budget batches of the dataset's samples of `epoch` (its `epoch_indices`, a mixture's weighted draw)."""
    picks = dataset.epoch_indices(seed, epoch)
    batches, skipped = token_budget_batches(dataset.lengths[picks], cfg_data.max_tokens_per_batch,
                                            cfg_data.max_length, cfg_data.bucket_size, seed, epoch)
    if skipped and epoch == 0:
        log.warning("skipping %d samples longer than data.max_length=%d", skipped, cfg_data.max_length)
    if not batches:
        raise ValueError("no training batch: every sample exceeds data.max_length or the cache is empty")
    return [[int(picks[i]) for i in b] for b in batches]
