"""Reading a cache: random access by global sample index and deterministic iteration over committed shards."""

import asyncio
import bisect
import hashlib
import json
import logging
from functools import cached_property
from itertools import product

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load
from zarr.core.sync import sync

from cache_schema import chunks
from cache_schema.layout import (CHECKSUMS, CHECKSUMS_SCHEMA, COMMIT_MARKER, HEAD_FILE, MANIFEST, MARKER_SCHEMA,
                                 META_SCHEMA, SHARDS_DIR, SUMMARY, SUMMARY_SCHEMA, TOKENIZER_DIR, ZARR_METADATA,
                                 CacheCorruptionError, CacheError, Manifest, Sample, check_compatible)
from cache_schema.storage import JSON_LIMIT, Location

log = logging.getLogger(__name__)


def load_manifest(loc: Location) -> Manifest:
    if not loc.exists(MANIFEST):
        raise CacheError(f"{loc.url} is not a dflash-offline cache: {MANIFEST} not found")
    return Manifest.from_dict(loc.read_json(MANIFEST), where=loc.where(MANIFEST))


class CacheReader:
    """Committed shards only, in name order. `expect`, when given, must match the cache's identity.

    A shard is checked when first opened: every array has the shape its marker's counts imply and every chunk
    file exists (one listing per shard), so a deleted chunk can never read back as zeros.
    """

    def __init__(self, url: str, expect: Manifest | None = None):
        self.loc = Location(url)
        self.manifest = load_manifest(self.loc)
        if expect is not None:
            check_compatible(self.manifest, expect, f"cache {url}")
        self.shards, self.uncommitted = self.loc.shard_names()
        self.markers = {name: self.loc.read_json(SHARDS_DIR, name, COMMIT_MARKER, schema=MARKER_SCHEMA)
                        for name in self.shards}
        counts = [self.markers[n]["samples"] for n in self.shards]
        self.starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._arrays: dict = {}
        self._plans: dict = {}  # (shard, array) -> chunks.ChunkPlan, or None where zarr reads it
        self._offsets: dict = {}
        self._metas: dict = {}
        if not self.manifest.writes_empty_chunks:
            log.warning("%s: schema %s cache; its all-zero loss_mask chunks were never written, so a deleted one "
                        "cannot be told from them. Re-extract for the full check.", url, self.manifest.schema_version)

    def __getstate__(self):
        # Zarr handles do not travel to DataLoader workers; each worker reopens (and rechecks) what it reads.
        state = self.__dict__.copy()
        state["_arrays"], state["_plans"], state["_offsets"], state["_metas"] = {}, {}, {}, {}
        return state

    def __len__(self) -> int:
        return int(self.starts[-1])

    def _open(self, shard: str) -> None:
        """Open every array of a shard and check its shape and the presence of each of its chunks."""
        marker = self.markers[shard]
        expected = self.manifest.shard_shapes(marker["tokens"], marker["samples"])
        recorded = marker.get("chunks")  # since 1.1
        arrays, where = {}, f"shard {shard}"
        # zarr: KeyError or FileNotFoundError for a missing node, ValueError for an invalid zarr.json, TypeError or
        # AttributeError for one that is valid JSON of the wrong types (a list, a number, attributes that are a list).
        try:
            # zarr reads a metadata file whole, whatever it is: it must be a small regular one.
            self.loc.check_file(SHARDS_DIR, shard, ZARR_METADATA, limit=JSON_LIMIT)
            group = self.loc.open_shard(shard, mode="r")
            for name in expected:
                where = f"shard {shard}, array {name}"
                self.loc.check_file(SHARDS_DIR, shard, name, ZARR_METADATA, limit=JSON_LIMIT)
                arrays[name] = group[name]
        except (KeyError, ValueError, TypeError, AttributeError, FileNotFoundError) as e:
            raise CacheCorruptionError(f"{where}: cannot be opened: {type(e).__name__}: {e}") from e
        chunk_files = {}
        for name, shape in expected.items():
            arr = arrays[name]
            if shape is not None and tuple(arr.shape) != shape:
                raise CacheCorruptionError(f"shard {shard}, array {name}: shape {tuple(arr.shape)}, its commit "
                                           f"marker implies {shape}")
            if recorded is not None and recorded.get(name) != arr.nchunks:
                raise CacheCorruptionError(f"shard {shard}, array {name}: {arr.nchunks} chunks, its commit marker "
                                           f"says {recorded.get(name)}")
            if name != "loss_mask" or self.manifest.writes_empty_chunks:
                grid = [range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks)]
                chunk_files.update({f"{name}/{arr.metadata.encode_chunk_key(idx)}": name for idx in product(*grid)})
        limit = {name: chunks.max_chunk_bytes(int(np.prod(arr.chunks)) * arr.dtype.itemsize)
                 for name, arr in arrays.items()}
        absent = self.loc.absent({f: limit[name] for f, name in chunk_files.items()}, SHARDS_DIR, shard)
        if absent:
            name = chunk_files[absent[0]]
            count = sum(chunk_files[a] == name for a in absent)
            raise CacheCorruptionError(f"shard {shard}, array {name}: {count} of {arrays[name].nchunks} chunk files "
                                       f"missing (first: {absent[0]})")
        for name, arr in arrays.items():
            self._arrays[shard, name] = arr
            # A 1.0 cache's absent loss_mask chunks mean zeros, which only zarr fills in.
            whole = name != "loss_mask" or self.manifest.writes_empty_chunks
            self._plans[shard, name] = chunks.plan(arr, self.loc.path(SHARDS_DIR, shard, name),
                                                   f"shard {shard}, array {name}") if whole else None

    def read(self, shard: str, array: str, sel=slice(None)) -> np.ndarray:
        """Read `array[sel]` of a shard; a missing chunk or a failed checksum names the shard and array."""
        if (shard, array) not in self._arrays:
            self._open(shard)
        try:
            return self._arrays[shard, array][sel]
        except ValueError as e:  # zarr reports a crc32c mismatch (any flipped or cut byte) as ValueError
            raise CacheCorruptionError(f"shard {shard}, array {array}: {e}") from e

    def offsets(self, shard: str) -> np.ndarray:
        if shard not in self._offsets:
            off = self.read(shard, "offsets")
            if off[0] != 0 or np.any(np.diff(off) < 0) or off[-1] != self.markers[shard]["tokens"]:
                raise CacheCorruptionError(f"shard {shard}, array offsets: not a monotone range "
                                           f"0..{self.markers[shard]['tokens']}")
            self._offsets[shard] = off
        return self._offsets[shard]

    def locate(self, index: int) -> tuple[str, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for a cache of {len(self)} samples")
        s = bisect.bisect_right(self.starts, index) - 1
        return self.shards[s], index - int(self.starts[s])

    def metas(self, shard: str) -> list[dict]:
        if shard not in self._metas:
            try:
                metas = json.loads(self.read(shard, "meta").tobytes())
            except (ValueError, RecursionError) as e:  # as Location.read_json
                raise CacheCorruptionError(f"shard {shard}, array meta: not valid JSON: {e}") from e
            META_SCHEMA.check(metas, f"shard {shard}, array meta")
            if len(metas) != self.markers[shard]["samples"]:
                raise CacheCorruptionError(f"shard {shard}, array meta: {len(metas)} entries, commit marker says "
                                           f"{self.markers[shard]['samples']} samples")
            self._metas[shard] = metas
        return self._metas[shard]

    def __getitem__(self, index: int) -> Sample:
        return self.read_samples([index])[0]

    def read_samples(self, indices, hidden_into: list[torch.Tensor] | None = None) -> list[Sample]:
        """The samples at `indices` (global, any order, repeats allowed), in that order.

        All chunks of all arrays are fetched in one call and decoded on a thread pool, each chunk once even
        where neighbouring samples share it (`cache_schema/chunks.py`). `hidden_into`, when given, holds one
        C-contiguous bf16 tensor per index, shaped like that sample's hidden states: they are written there (a
        bf16 cache decodes its chunks straight into them) and become the samples' `hidden_TLH`.
        `train.data.CacheDataset.batch` passes the rows of its padded batch, so no sample-sized copy is made.
        """
        located = [self.locate(int(index)) for index in indices]
        codec = self.manifest.codec
        names = ("input_ids", "loss_mask", "position_ids", *codec.arrays)
        spans = []
        for shard, local in located:
            off = self.offsets(shard)  # opens (and checks) the shard
            spans.append(slice(int(off[local]), int(off[local + 1])))
        into: list = [None] * (len(located) * len(names))
        if hidden_into is not None:
            L, H = len(self.manifest.target_layer_ids), self.manifest.target.hidden_size
            for j, (t, span) in enumerate(zip(hidden_into, spans, strict=True)):
                if t.dtype != torch.bfloat16 or tuple(t.shape) != (span.stop - span.start, L, H) \
                        or not t.is_contiguous() or t.device.type != "cpu":
                    raise ValueError(f"hidden_into[{j}]: {t.dtype} {tuple(t.shape)} on {t.device} for a sample of "
                                     f"{span.stop - span.start} x {L} x {H} bf16 (C-contiguous, CPU)")
                if codec.name == "bf16":
                    into[j * len(names) + names.index("hidden")] = t.view(torch.int16).numpy().view(np.uint16)
        data = self._fetch([(shard, name, span) for (shard, _), span in zip(located, spans) for name in names],
                           into)
        out = []
        vocab = self.manifest.target.vocab_size
        for j, (shard, local) in enumerate(located):
            arrays = dict(zip(names, data[j * len(names):(j + 1) * len(names)]))
            ids = arrays["input_ids"]
            if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= vocab):  # verify's rule, cheap: ids index tables
                bad = int(ids[(ids < 0) | (ids >= vocab)][0])
                raise CacheCorruptionError(f"shard {shard}, sample {local}: token id {bad} outside the target "
                                           f"vocabulary [0, {vocab}) (tools.inspect_cache --verify checks the rest)")
            meta = dict(self.metas(shard)[local])
            if hidden_into is None:
                hidden = codec.decode(*(arrays[name] for name in codec.arrays))
            elif codec.name == "bf16":
                hidden = hidden_into[j]
            else:
                hidden = hidden_into[j].copy_(codec.decode(*(arrays[name] for name in codec.arrays)))
            out.append(Sample(key=meta.pop("key"), input_ids=arrays["input_ids"],
                              loss_mask=arrays["loss_mask"].astype(bool),
                              position_ids=arrays["position_ids"].T.copy(), hidden_TLH=hidden, meta=meta))
        return out

    def _fetch(self, reads: list[tuple[str, str, slice]], into: list | None = None) -> list[np.ndarray]:
        """Each (shard, array, token slice), into `into[k]` where that is an array: straight from the chunk
        files where `chunks.plan` knows the array's codec chain, through zarr (all concurrently) for the rest."""
        into = into or [None] * len(reads)
        out: list = [None] * len(reads)
        direct = [k for k, (shard, name, _) in enumerate(reads) if self._plans[shard, name] is not None]
        ranges = [(self._plans[reads[k][:2]], reads[k][2].start, reads[k][2].stop) for k in direct]
        for k, rows in zip(direct, chunks.read_ranges(self.loc.fs, ranges, [into[k] for k in direct])):
            out[k] = rows
        rest = [k for k in range(len(reads)) if out[k] is None]

        async def fetch():
            return await asyncio.gather(*(self._arrays[reads[k][:2]].async_array.getitem(reads[k][2]) for k in rest),
                                        return_exceptions=True)

        for k, result in zip(rest, sync(fetch()) if rest else []):
            if isinstance(result, ValueError):  # zarr reports a crc32c mismatch as ValueError
                raise CacheCorruptionError(f"shard {reads[k][0]}, array {reads[k][1]}: {result}") from result
            if isinstance(result, BaseException):
                raise result
            if into[k] is not None:
                into[k][...] = result
                result = into[k]
            out[k] = result
        return out

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

    @cached_property
    def checksums(self) -> dict[str, str] | None:
        """sha256 of the head and tokenizer files; None for a 1.0 cache, which recorded none."""
        if not self.loc.exists(CHECKSUMS):
            if self.manifest.writes_empty_chunks:
                raise CacheCorruptionError(f"{self.loc.url}/{CHECKSUMS} not found: the extraction that made this "
                                           "cache stopped before its target files were complete; run it again")
            return None
        return self.loc.read_json(CHECKSUMS, schema=CHECKSUMS_SCHEMA)

    def _check_file(self, rel: str, data: bytes | None = None) -> None:
        if self.checksums is None:
            return
        if rel not in self.checksums:
            raise CacheCorruptionError(f"{self.loc.url}/{rel}: no checksum recorded in {CHECKSUMS}")
        if not self.loc.exists(rel):
            raise CacheCorruptionError(f"{self.loc.url}/{rel} is missing")
        got = hashlib.sha256(data).hexdigest() if data is not None else self.loc.sha256(rel)
        if got != self.checksums[rel]:
            raise CacheCorruptionError(f"{self.loc.url}/{rel}: sha256 {got[:16]}... does not match the "
                                       f"{self.checksums[rel][:16]}... recorded in {CHECKSUMS}")

    def head_tensors(self) -> dict[str, torch.Tensor]:
        """The target's embedding, head and final norm, after checking the file against its checksum."""
        if not self.loc.exists(HEAD_FILE):
            raise CacheError(f"{self.loc.url}/{HEAD_FILE} not found: extraction did not export the target head")
        data = self.loc.read_bytes(HEAD_FILE)
        self._check_file(HEAD_FILE, data)
        try:
            return load(data)
        except SafetensorError as e:
            raise CacheCorruptionError(f"{self.loc.url}/{HEAD_FILE}: {e}") from e

    def check_tokenizer(self) -> list[str]:
        """Check every recorded tokenizer file against its checksum; return their paths inside the cache."""
        names = [rel for rel in (self.checksums or {}) if rel.startswith(f"{TOKENIZER_DIR}/")]
        for rel in names:
            self._check_file(rel)
        return names

    def summary(self) -> dict | None:
        """The run statistics extraction wrote at its end (None if no run finished yet)."""
        if not self.loc.exists(SUMMARY):
            return None
        return self.loc.read_json(SUMMARY, schema=SUMMARY_SCHEMA)

    def missing_shards(self) -> dict[str, int]:
        """Shards `summary.json` lists (name -> samples) that are not committed now."""
        listed = (self.summary() or {}).get("shard_samples", {})
        return {name: n for name, n in listed.items() if name not in self.markers}

    def describe(self) -> str:
        """One line for a training log: what is read, and what the last extraction said should be there."""
        s = self.stats
        line = (f"cache {self.loc.url}: {s['shards']} committed shards, {s['samples']} samples, {s['tokens']} "
                f"tokens ({s['supervised_tokens']} supervised)")
        missing = self.missing_shards()
        if missing:
            line += (f"; MISSING {len(missing)} shards with {sum(missing.values())} samples that summary.json "
                     f"lists: {', '.join(sorted(missing))}")
        return line

    @cached_property
    def stats(self) -> dict:
        keys = ("samples", "tokens", "supervised_tokens", "image_tokens")
        out = {k: int(sum(m.get(k, 0) for m in self.markers.values())) for k in keys}
        out["shards"] = len(self.shards)
        out["uncommitted_shards"] = len(self.uncommitted)
        return out
