"""Reading a cache: random access by global sample index and deterministic iteration over committed shards."""

import bisect
import json
from functools import cached_property

import numpy as np
import torch
from safetensors.torch import load

from cache_schema.codecs import fp8_decode, words_to_bf16
from cache_schema.layout import (COMMIT_MARKER, HEAD_FILE, MANIFEST, SHARDS_DIR, CacheCorruptionError, CacheError,
                                 Manifest, Sample)
from cache_schema.storage import Location
from cache_schema.writer import check_compatible


def load_manifest(loc: Location) -> Manifest:
    if not loc.exists(MANIFEST):
        raise CacheError(f"{loc.url} is not a dflash-offline cache: {MANIFEST} not found")
    try:
        data = loc.read_json(MANIFEST)
    except json.JSONDecodeError as e:
        raise CacheCorruptionError(f"{loc.url}/{MANIFEST} is not valid JSON: {e}") from e
    return Manifest.from_dict(data, where=f"{loc.url}/{MANIFEST}")


class CacheReader:
    """Committed shards only, in name order. `expect`, when given, must match the cache's identity."""

    def __init__(self, url: str, expect: Manifest | None = None):
        self.loc = Location(url)
        self.manifest = load_manifest(self.loc)
        if expect is not None:
            check_compatible(self.manifest, expect, f"cache {url}")
        self.shards, self.uncommitted = self.loc.shard_names()
        self.markers = {name: self._marker(name) for name in self.shards}
        counts = [self.markers[n]["samples"] for n in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._groups: dict = {}
        self._offsets: dict = {}
        self._metas: dict = {}
        self._arrays: dict = {}

    def __getstate__(self):
        # Zarr handles do not travel to DataLoader workers; each worker reopens what it reads.
        state = self.__dict__.copy()
        state["_groups"], state["_offsets"], state["_metas"], state["_arrays"] = {}, {}, {}, {}
        return state

    def _marker(self, name: str) -> dict:
        try:
            return self.loc.read_json(SHARDS_DIR, name, COMMIT_MARKER)
        except json.JSONDecodeError as e:
            raise CacheCorruptionError(f"shard {name}: commit marker is not valid JSON: {e}") from e

    def __len__(self) -> int:
        return int(self.starts[-1])

    def read(self, shard: str, array: str, sel=slice(None)) -> np.ndarray:
        """Read `array[sel]` of a shard; any decoding or checksum failure names the shard and array."""
        try:
            if (shard, array) not in self._arrays:
                if shard not in self._groups:
                    self._groups[shard] = self.loc.open_shard(shard, mode="r")
                self._arrays[shard, array] = self._groups[shard][array]
            return self._arrays[shard, array][sel]
        except Exception as e:  # zarr raises ValueError, KeyError, JSON and codec errors alike
            raise CacheCorruptionError(f"shard {shard}, array {array}: {type(e).__name__}: {e}") from e

    def offsets(self, shard: str) -> np.ndarray:
        if shard not in self._offsets:
            off = self.read(shard, "offsets")
            if off.shape[0] != self.markers[shard]["samples"] + 1:
                raise CacheCorruptionError(f"shard {shard}, array offsets: {off.shape[0] - 1} samples, "
                                           f"commit marker says {self.markers[shard]['samples']}")
            self._offsets[shard] = off
        return self._offsets[shard]

    def locate(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)} samples")
        s = bisect.bisect_right(self.starts, index) - 1
        return self.shards[s], index - int(self.starts[s])

    def metas(self, shard: str) -> list[dict]:
        if shard not in self._metas:
            self._metas[shard] = json.loads(self.read(shard, "meta").tobytes())
        return self._metas[shard]

    def __getitem__(self, index: int) -> Sample:
        shard, local = self.locate(index)
        off = self.offsets(shard)
        span = slice(int(off[local]), int(off[local + 1]))
        if self.manifest.storage.hidden_dtype == "bf16":
            hidden = words_to_bf16(self.read(shard, "hidden", span))
        else:
            hidden = fp8_decode(self.read(shard, "hidden", span), self.read(shard, "hidden_scale", span))
        meta = dict(self.metas(shard)[local])
        return Sample(key=meta.pop("key"), input_ids=self.read(shard, "input_ids", span),
                      loss_mask=self.read(shard, "loss_mask", span).astype(bool),
                      position_ids=self.read(shard, "position_ids", span).T.copy(), hidden_TLH=hidden, meta=meta)

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    def lengths(self) -> np.ndarray:
        """Token count of every sample in global order (for length-bucketed batching)."""
        if not self.shards:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.diff(self.offsets(s)) for s in self.shards])

    def token_frequencies(self) -> np.ndarray:
        total = np.zeros(self.manifest.target.vocab_size, dtype=np.int64)
        for s in self.shards:
            total += self.read(s, "token_freq")
        return total

    def head_tensors(self) -> dict[str, torch.Tensor]:
        if not self.loc.exists(HEAD_FILE):
            raise CacheError(f"{self.loc.url}/{HEAD_FILE} not found: extraction did not export the target head")
        with self.loc.fs.open(self.loc.path(HEAD_FILE), "rb") as f:
            return load(f.read())

    @cached_property
    def stats(self) -> dict:
        keys = ("samples", "tokens", "supervised_tokens", "image_tokens")
        out = {k: int(sum(m.get(k, 0) for m in self.markers.values())) for k in keys}
        out["shards"] = len(self.shards)
        out["uncommitted_shards"] = len(self.uncommitted)
        return out
