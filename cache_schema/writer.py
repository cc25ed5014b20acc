"""Writing a cache: one `CacheWriter` per process, one `ShardWriter` per output shard.

A shard is a zarr group filled incrementally (token arrays are appended in whole chunks, so no chunk is
written twice) and made visible by the commit marker written last. A process killed before that leaves an
uncommitted group that readers ignore and the next writer of the same shard name removes first.
"""

import hashlib
import json
import os
import time
from collections import Counter

import numpy as np
import torch
from safetensors.torch import save

from cache_schema.layout import (CHECKSUMS, COMMIT_MARKER, HEAD_FILE, HEAD_TENSORS, MANIFEST, SHARDS_DIR, SUMMARY,
                                 TOKENIZER_DIR, CacheError, Manifest, Sample, check_compatible)
from cache_schema.reader import CacheReader, load_manifest
from cache_schema.storage import Location, compressors

# Token-axis chunks buffered before a write; larger batches amortise per-write overhead on object stores.
FLUSH_CHUNKS = 4
# zarr skips chunks equal to the fill value; an all-zero loss-mask chunk is legitimate, and only a cache whose
# every chunk exists can tell a deleted chunk from a zero one.
EVERY_CHUNK = {"write_empty_chunks": True}


class CacheWriter:
    """Opens (or creates) a cache root for writing; refuses a root made for another target or config."""

    def __init__(self, url: str, manifest: Manifest):
        self.loc = Location(url)
        self.manifest = manifest
        self.loc.check_writable()
        if self.loc.exists(MANIFEST):
            check_compatible(load_manifest(self.loc), manifest, f"cache {url}")
        else:
            # Every rank writes identical bytes atomically, so a race between ranks is harmless.
            self.loc.write_json_atomic(manifest.to_dict(), MANIFEST)

    def committed(self) -> set[str]:
        return set(self.loc.shard_names()[0])

    def shard(self, name: str) -> "ShardWriter":
        if "/" in name or name.startswith((".", "_")):
            raise ValueError(f"shard name {name!r} must be a plain name")
        if self.loc.exists(SHARDS_DIR, name, COMMIT_MARKER):
            raise CacheError(f"shard {name} is already committed in {self.loc.url}; committed shards are never "
                             "rewritten")
        if self.loc.exists(SHARDS_DIR, name):
            self.loc.remove_shard(name)  # leftover of a killed run
        return ShardWriter(self.loc, self.manifest, name)

    def target_files_written(self) -> bool:
        return self.loc.exists(CHECKSUMS)

    def write_target_files(self, head: dict[str, torch.Tensor], tokenizer_dir: str) -> None:
        """The head tensors and the tokenizer files of a local folder, then `checksums.json` naming each.

        The checksums are written last, so a run killed before them rewrites all of it on the next start.
        """
        missing = [k for k in HEAD_TENSORS if k not in head]
        if missing:
            raise ValueError(f"target head tensors missing: {missing}")
        data = save({k: head[k].detach().cpu().contiguous() for k in HEAD_TENSORS})
        self.loc.write_bytes_atomic(data, HEAD_FILE)
        sums = {HEAD_FILE: hashlib.sha256(data).hexdigest()}
        local = Location(tokenizer_dir)
        sums.update({f"{TOKENIZER_DIR}/{rel}": local.sha256(rel) for rel in sorted(local.files_under())})
        if self.loc.exists(TOKENIZER_DIR):
            self.loc.fs.rm(self.loc.path(TOKENIZER_DIR), recursive=True)
        staging = self.loc.path(f"{TOKENIZER_DIR}.tmp-{time.time_ns()}-{os.getpid()}")
        self.loc.fs.put(tokenizer_dir, staging, recursive=True)
        self.loc.fs.mv(staging, self.loc.path(TOKENIZER_DIR), recursive=True)
        self.loc.write_json_atomic(sums, CHECKSUMS)

    def write_summary(self, run: dict) -> dict:
        """Aggregate every committed shard's statistics, skip counts and sample keys into summary.json.

        `shard_samples` lets a later `verify` name any shard that went missing; keys held by more than one
        sample (within or across shards) are counted, since they usually mean an input was listed twice.
        """
        reader = CacheReader(self.loc.url)
        skipped, turns = Counter(), Counter()
        for marker in reader.markers.values():
            skipped.update(marker.get("skipped", {}))
            turns.update(marker.get("turns", {}))
        keys = Counter(meta["key"] for shard in reader.shards for meta in reader.metas(shard))
        repeated = sorted(k for k, n in keys.items() if n > 1)
        summary = {**reader.stats, "shard_samples": {s: m["samples"] for s, m in reader.markers.items()},
                   "skipped": dict(sorted(skipped.items())), "turns": dict(sorted(turns.items())),
                   "duplicate_keys": len(repeated),
                   "duplicate_key_examples": repeated[:10], **run}
        self.loc.write_json_atomic(summary, SUMMARY)
        return summary


class _Appender:
    """Buffers rows of one token-axis array and appends them to zarr in whole chunks."""

    def __init__(self, array, chunk: int):
        self.array, self.chunk, self.pieces, self.buffered = array, chunk, [], 0

    def add(self, rows: np.ndarray) -> None:
        self.pieces.append(rows)
        self.buffered += rows.shape[0]
        if self.buffered >= FLUSH_CHUNKS * self.chunk:
            self.flush(final=False)

    def flush(self, final: bool) -> None:
        if not self.pieces:
            return
        rows = np.concatenate(self.pieces)
        n = rows.shape[0] if final else rows.shape[0] // self.chunk * self.chunk
        start = self.array.shape[0]
        self.array.resize((start + n, *self.array.shape[1:]))
        self.array[start:start + n] = rows[:n]
        self.pieces = [rows[n:]] if n < rows.shape[0] else []
        self.buffered = rows.shape[0] - n


class ShardWriter:
    def __init__(self, loc: Location, manifest: Manifest, name: str):
        self.loc, self.manifest, self.name = loc, manifest, name
        st = manifest.storage
        self.group = loc.open_shard(name, mode="w")
        comp = compressors(st.compression)
        light = compressors("zstd")  # ids, masks and positions compress well and are small either way
        self.columns = {}
        for arr_name, (row, dtype) in manifest.token_arrays().items():
            arr = self.group.create_array(arr_name, shape=(0, *row), chunks=(st.chunk_tokens, *row), dtype=dtype,
                                          compressors=comp if arr_name == "hidden" else light, config=EVERY_CHUNK)
            self.columns[arr_name] = _Appender(arr, st.chunk_tokens)
        self.group.attrs.update({"hidden_dtype": st.hidden_dtype, "target_layer_ids": manifest.target_layer_ids})
        self.offsets = [0]
        self.metas: list[dict] = []
        self.token_freq = np.zeros(manifest.target.vocab_size, dtype=np.int64)
        self.supervised = 0
        self.image_tokens = 0
        self.committed = False

    def add(self, sample: Sample) -> None:
        assert not self.committed, "shard already committed"
        sample.check(self.manifest.num_layers, self.manifest.target.hidden_size)
        mask = np.asarray(sample.loss_mask, dtype=bool)
        ids = np.asarray(sample.input_ids, dtype=np.int32)
        if ids.size and (ids.min() < 0 or ids.max() >= self.manifest.target.vocab_size):
            raise ValueError(f"sample {sample.key}: token id outside the target vocabulary")
        self.columns["input_ids"].add(ids)
        self.columns["loss_mask"].add(mask.astype(np.uint8))
        self.columns["position_ids"].add(np.asarray(sample.position_ids, dtype=np.int32).T)
        codec = self.manifest.codec
        for name, rows in zip(codec.arrays, codec.encode(sample.hidden_TLH)):
            self.columns[name].add(rows)
        self.offsets.append(self.offsets[-1] + len(sample))
        self.metas.append({"key": sample.key, **sample.meta})
        self.token_freq += np.bincount(ids[mask], minlength=self.token_freq.size)
        self.supervised += int(mask.sum())
        self.image_tokens += int(sample.meta.get("num_image_tokens", 0))

    def commit(self, extra: dict | None = None) -> dict:
        """Flush everything, then write the marker that makes the shard visible. Returns its statistics."""
        for col in self.columns.values():
            col.flush(final=True)
        light = compressors("zstd")
        offsets = np.asarray(self.offsets, dtype=np.int64)
        meta = np.frombuffer(json.dumps(self.metas).encode(), dtype=np.uint8)
        for name, data in (("offsets", offsets), ("meta", meta), ("token_freq", self.token_freq)):
            self.group.create_array(name, data=data, chunks=data.shape, compressors=light, config=EVERY_CHUNK)
        chunks = {name: int(self.group[name].nchunks) for name in sorted(self.group.array_keys())}
        stats = {"samples": len(self.metas), "tokens": int(offsets[-1]), "supervised_tokens": self.supervised,
                 "image_tokens": self.image_tokens, "chunks": chunks, "committed_at": time.time(),
                 **(extra or {})}
        self.loc.write_json_atomic(stats, SHARDS_DIR, self.name, COMMIT_MARKER)
        self.committed = True
        return stats
