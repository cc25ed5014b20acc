"""Writing a cache: one `CacheWriter` per process, one `ShardWriter` per output shard.

A shard is a zarr group filled incrementally (token arrays are appended in whole chunks, so no chunk is
written twice) and made visible by the commit marker written last. A process killed before that leaves an
uncommitted group that readers ignore and the next writer of the same shard name removes first.
"""

import json
import time

import numpy as np
import torch
from safetensors.torch import save

from cache_schema.codecs import bf16_to_words, fp8_encode
from cache_schema.layout import (COMMIT_MARKER, HEAD_FILE, HEAD_TENSORS, MANIFEST, SHARDS_DIR, SUMMARY,
                                 CacheError, IncompatibleCacheError, Manifest, Sample)
from cache_schema.storage import Location, compressors

# Token-axis chunks buffered before a write; larger batches amortise per-write overhead on object stores.
FLUSH_CHUNKS = 4


def check_compatible(existing: Manifest, wanted: Manifest, where: str) -> None:
    bad = existing.mismatches(wanted)
    if bad:
        e, w = existing.to_dict(), wanted.to_dict()

        def value(d, key):
            for part in key.split("."):
                d = d.get(part) if isinstance(d, dict) else None
            return d

        detail = "; ".join(f"{k}: cache has {value(e, k)!r}, requested {value(w, k)!r}" for k in bad)
        raise IncompatibleCacheError(f"{where} belongs to another target or configuration ({detail}). "
                                     "Use a new cache directory or change the keys named here.")


class CacheWriter:
    """Opens (or creates) a cache root for writing; refuses a root made for another target or config."""

    def __init__(self, url: str, manifest: Manifest):
        self.loc = Location(url)
        self.manifest = manifest
        if self.loc.exists(MANIFEST):
            existing = Manifest.from_dict(self.loc.read_json(MANIFEST), where=f"{url}/{MANIFEST}")
            check_compatible(existing, manifest, f"cache {url}")
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

    def write_head(self, tensors: dict[str, torch.Tensor]) -> None:
        missing = [k for k in HEAD_TENSORS if k not in tensors]
        if missing:
            raise ValueError(f"target head tensors missing: {missing}")
        data = save({k: tensors[k].detach().cpu().contiguous() for k in HEAD_TENSORS})
        self.loc.write_bytes_atomic(data, HEAD_FILE)

    def write_summary(self, summary: dict) -> None:
        self.loc.write_json_atomic(summary, SUMMARY)


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
        L, H = manifest.num_layers, manifest.target.hidden_size
        self.group = loc.open_shard(name, mode="w")
        comp = compressors(st.compression)
        light = compressors("zstd")  # ids, masks and positions compress well and are small either way

        def make(arr_name, row_shape, dtype, codecs):
            arr = self.group.create_array(arr_name, shape=(0, *row_shape), chunks=(st.chunk_tokens, *row_shape),
                                          dtype=dtype, compressors=codecs)
            return _Appender(arr, st.chunk_tokens)

        self.columns = {
            "input_ids": make("input_ids", (), "int32", light),
            "loss_mask": make("loss_mask", (), "uint8", light),
            "position_ids": make("position_ids", (3,), "int32", light),
        }
        if st.hidden_dtype == "bf16":
            self.columns["hidden"] = make("hidden", (L, H), "uint16", comp)
        else:
            self.columns["hidden"] = make("hidden", (L, H), "uint8", comp)
            self.columns["hidden_scale"] = make("hidden_scale", (L,), "float32", light)
        self.group.attrs.update({"hidden_dtype": st.hidden_dtype, "target_layer_ids": manifest.target_layer_ids})
        self.offsets = [0]
        self.metas: list[dict] = []
        self.token_freq = np.zeros(manifest.target.vocab_size, dtype=np.int64)
        self.supervised = 0
        self.image_tokens = 0
        self.committed = False

    def __len__(self) -> int:
        return len(self.metas)

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
        if self.manifest.storage.hidden_dtype == "bf16":
            self.columns["hidden"].add(bf16_to_words(sample.hidden_TLH))
        else:
            codes, scales = fp8_encode(sample.hidden_TLH)
            self.columns["hidden"].add(codes)
            self.columns["hidden_scale"].add(scales)
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
        self.group.create_array("offsets", data=offsets, chunks=(max(1, offsets.size),), compressors=light)
        meta = np.frombuffer(json.dumps(self.metas).encode(), dtype=np.uint8)
        self.group.create_array("meta", data=meta, chunks=(max(1, meta.size),), compressors=light)
        self.group.create_array("token_freq", data=self.token_freq, chunks=(self.token_freq.size,),
                                compressors=light)
        stats = {"samples": len(self.metas), "tokens": int(offsets[-1]), "supervised_tokens": self.supervised,
                 "image_tokens": self.image_tokens, "committed_at": time.time(), **(extra or {})}
        self.loc.write_json_atomic(stats, SHARDS_DIR, self.name, COMMIT_MARKER)
        self.committed = True
        return stats
