"""Several caches of one target as one training set (`data.caches`), mixed by weight; one cache is a mixture of
one and trains exactly as it always did."""

import random

import numpy as np

from cache_schema import CacheReader
from cache_schema.audit import recorded_or_fresh, refused_layers
from cache_schema.layout import HEAD_FILE, TOKENIZER_DIR
from train.config import CacheSource, served_position_source
from train.data import CacheDataset, padded_batch, split_shards

# What a drafter needs to be the same across caches it trains on or is judged on: the target, the layers read and
# the tokenizer. Storage (bf16/fp8) and generation settings may differ: a GUI cache extracted with longer answers
# mixes with a chat cache, and a drafter trained on fp8 states is replayed on bf16 ones.
SAME_TARGET = ("target", "target_layer_ids", "layer_convention", "tokenizer_fingerprint")


def target_mismatches(manifest, other) -> list[str]:
    """The dotted identity keys of SAME_TARGET in which two cache manifests differ."""
    return [k for k in manifest.mismatches(other) if k.split(".")[0] in SAME_TARGET]


def open_caches(sources: list[CacheSource]) -> list[CacheReader]:
    """A reader per cache, each refused unless it holds the first one's target, layers, tokenizer and head."""
    readers = [CacheReader(s.url) for s in sources]
    first = readers[0]
    for i, reader in enumerate(readers[1:], start=1):
        this, that = reader.manifest.to_dict(), first.manifest.to_dict()
        bad = [f"{k} {_value(this, k)!r} vs {_value(that, k)!r}"
               for k in target_mismatches(reader.manifest, first.manifest)]
        sums, first_sums = reader.checksums or {}, first.checksums or {}
        bad += [f"the sha256 of {rel}" for rel in sorted(set(sums) & set(first_sums))
                if (rel == HEAD_FILE or rel.startswith(f"{TOKENIZER_DIR}/")) and sums[rel] != first_sums[rel]]
        if bad:
            raise ValueError(f"data.caches[{i}] ({sources[i].url}) cannot be mixed with data.caches[0] "
                             f"({sources[0].url}): they differ in {'; '.join(bad)}")
    return readers


def check_audits(sources: list[CacheSource], readers: list[CacheReader], accept: bool) -> None:
    """Refuse a cache whose hidden states are dead or not finite in some layer (its audit), unless `accept`."""
    for source, reader in zip(sources, readers):
        refused = refused_layers(recorded_or_fresh(reader))
        if refused and not accept:
            named = "; ".join(f"{k} {' and '.join(v)}" for k, v in refused.items())
            raise ValueError(f"cache {source.url}: its audit flags target layer(s) {named}: a drafter trained on "
                             "them learns from nothing there (tools.inspect_cache --audit shows the statistics); "
                             "re-extract, or set data.accept_flagged_layers=true to train on it anyway")


def _value(d: dict, key: str):
    for part in key.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


class MixedDataset:
    """The training samples of several caches. An epoch takes each cache's samples `weight` times: the whole
    part of the weight as full copies, the fraction as a random subset drawn afresh per (seed, epoch), so the
    mixture is deterministic and a resumed run draws what an uninterrupted one did. A sample's id (which keys
    its anchors and prefixes) is its index in its cache plus the sizes of the caches before it."""

    def __init__(self, parts: list[CacheDataset], weights: list[float]):
        self.parts, self.weights = parts, weights
        self.starts = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        self.id_offsets = np.concatenate([[0], np.cumsum([len(p.reader) for p in parts])]).astype(np.int64)
        self.lengths = (np.concatenate([p.lengths for p in parts]) if parts else np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, i: int) -> tuple[int, int]:
        k = int(np.searchsorted(self.starts, i, side="right")) - 1
        return k, i - int(self.starts[k])

    def epoch_indices(self, seed: int, epoch: int) -> np.ndarray:
        picks = []
        for k, (part, weight) in enumerate(zip(self.parts, self.weights)):
            whole, n = int(weight), len(part)
            own = np.arange(self.starts[k], self.starts[k + 1])
            picks += [own] * whole
            extra = round((weight - whole) * n)
            if extra:
                rng = random.Random((seed * 10_007 + epoch) * 1_000_003 + k)
                picks.append(own[sorted(rng.sample(range(n), extra))])
        return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)

    def epoch_samples(self, seed: int, epoch: int) -> list[int]:
        """Samples each cache contributes to `epoch`."""
        picks = self.epoch_indices(seed, epoch)
        return [int(((picks >= self.starts[k]) & (picks < self.starts[k + 1])).sum()) for k in range(len(self.parts))]

    def batch(self, indices: list[int]) -> dict:
        located = [self.locate(i) for i in indices]
        return padded_batch([(self.parts[k], j) for k, j in located],
                            [int(self.id_offsets[k]) + self.parts[k].index[j] for k, j in located])


def split(sources: list[CacheSource], readers: list[CacheReader], eval_shards: int, position_source: str):
    """(the training mixture, [(name, held-out samples)] per cache): each cache holds out its last shards."""
    parts, held = [], []
    for source, reader in zip(sources, readers):
        train_shards, eval_names = split_shards(reader, eval_shards)
        parts.append(CacheDataset(reader, train_shards, position_source))
        # Judged as served: a mixed drafter at the token index, as train.evaluate replays it by default.
        held.append((source.name, CacheDataset(reader, eval_names, served_position_source(position_source))))
    return MixedDataset(parts, [s.weight for s in sources]), held


def describe(sources: list[CacheSource], readers: list[CacheReader], train: MixedDataset, held, seed: int):
    """(console lines, the same as a dict for the trackers) of what is trained and evaluated on."""
    per_epoch = train.epoch_samples(seed, 0)
    lines, info = [], {}
    for source, reader, part, n, (_, ev) in zip(sources, readers, train.parts, per_epoch, held):
        mixed = f"; {source.name}: weight {source.weight:g}, {n} samples per epoch" if len(sources) > 1 else ""
        lines.append(f"{reader.describe()}\ntraining on {len(part.shards)} shards ({len(part)} samples), evaluating "
                     f"on {len(ev.shards)} ({len(ev)} samples){mixed}")
        info[source.name] = {"url": source.url, "weight": source.weight, "target": reader.manifest.target.name_or_path,
                             "train_samples": len(part), "samples_per_epoch": n, "eval_samples": len(ev),
                             **{k: v for k, v in reader.stats.items() if k != "uncommitted_shards"}}
    return "\n".join(lines), info
