"""The cache contract: file names, array names, schema version, the manifest and the sample record.

    ROOT/manifest.json                 identity (schema, target, layer ids, storage, tokenizer, generation)
    ROOT/target_head.safetensors       embed_tokens, lm_head, final_norm of the target
    ROOT/checksums.json                sha256 of the head and of every tokenizer file (written after them)
    ROOT/summary.json                  written at the end of a run: statistics, skip counts, samples per committed
                                       shard, duplicate keys, input shards left incomplete
    ROOT/tokenizer/                    the target's tokenizer files, so the cache decodes without the target
    ROOT/shards/NAME/                  one zarr v3 group per output shard
    ROOT/shards/NAME/_COMMITTED.json   written last: a shard without it does not exist for readers; holds the
                                       shard's counts and the chunk count of every array

Arrays of a shard (T = tokens of all its samples concatenated, N = samples, L = len(target_layer_ids)):
    input_ids int32 [T], loss_mask uint8 [T], position_ids int32 [T, 3], offsets int64 [N + 1],
    hidden uint16 [T, L, H] (bf16 words) or uint8 [T, L, H] (fp8 e4m3) with hidden_scale float32 [T, L],
    token_freq int64 [V] (supervised-token counts), meta uint8 (utf-8 JSON list, one dict per sample).

Since 1.1 every chunk of every array is written, all-zero ones included, so a missing chunk file is always
damage (zarr would otherwise read it back as zeros). 1.0 caches did not write all-zero chunks; they are read
with the presence check of `loss_mask` left out.
"""

from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np
import torch

from cache_schema.codecs import CODECS, HiddenCodec

SCHEMA_VERSION = "1.1"
MANIFEST = "manifest.json"
HEAD_FILE = "target_head.safetensors"
SUMMARY = "summary.json"
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
COMMIT_MARKER = "_COMMITTED.json"
CHECKSUMS = "checksums.json"
LAYER_CONVENTION = "decoder-layer output; id i == hf output_hidden_states[i + 1]"
HIDDEN_DTYPES = tuple(CODECS)
# Token-axis arrays besides the hidden states: name -> (row shape, dtype).
TOKEN_ARRAYS = {"input_ids": ((), "int32"), "loss_mask": ((), "uint8"), "position_ids": ((3,), "int32")}
HEAD_TENSORS = ("embed_tokens", "lm_head", "final_norm")


class CacheError(Exception):
    """Base class for problems with a cache on disk."""


class IncompatibleCacheError(CacheError, ValueError):
    """The cache was written by another schema, target or configuration than the one asked for."""


class CacheCorruptionError(CacheError):
    """Stored bytes do not match their checksums or the shard's own bookkeeping."""


@dataclass
class TargetInfo:
    """What identifies the target whose hidden states a cache holds."""

    name_or_path: str
    model_type: str
    num_hidden_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str  # hash of the target config; two caches match only if it matches


@dataclass
class StorageInfo:
    hidden_dtype: str = "bf16"
    chunk_tokens: int = 256
    compression: str = "zstd"  # bench/cache_bench.py: 0.80x the bytes of raw bf16 at 0.81x the read speed


@dataclass
class Manifest:
    target: TargetInfo
    target_layer_ids: list[int]
    storage: StorageInfo = field(default_factory=StorageInfo)
    tokenizer_fingerprint: str = ""
    generation: dict[str, Any] = field(default_factory=dict)
    special_tokens: dict[str, int] = field(default_factory=dict)  # image_token_id, eos_token_id, ...
    schema_version: str = SCHEMA_VERSION
    layer_convention: str = LAYER_CONVENTION

    # Keys that must agree for two writers (or a writer and an existing cache) to share one cache.
    IDENTITY = ("schema_version", "target", "target_layer_ids", "layer_convention", "storage",
                "tokenizer_fingerprint", "generation")

    def __post_init__(self):
        if self.storage.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"storage.hidden_dtype={self.storage.hidden_dtype!r}; choose from {HIDDEN_DTYPES}")

    @property
    def num_layers(self) -> int:
        return len(self.target_layer_ids)

    @property
    def codec(self) -> HiddenCodec:
        return CODECS[self.storage.hidden_dtype]

    @property
    def writes_empty_chunks(self) -> bool:
        """False for 1.0 caches, whose all-zero chunks were left unwritten."""
        return tuple(int(p) for p in self.schema_version.split(".")[:2]) >= (1, 1)

    def token_arrays(self) -> dict[str, tuple[tuple, str]]:
        """Every array along a shard's token axis: name -> (row shape, dtype)."""
        return {**TOKEN_ARRAYS, **self.codec.row_shapes(self.num_layers, self.target.hidden_size)}

    def shard_shapes(self, tokens: int, samples: int) -> dict[str, tuple | None]:
        """The shape of every array of a shard with these counts (`meta`: None, its byte length is free)."""
        shapes = {name: (tokens, *row) for name, (row, _) in self.token_arrays().items()}
        return {**shapes, "offsets": (samples + 1,), "token_freq": (self.target.vocab_size,), "meta": None}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "manifest") -> "Manifest":
        if not isinstance(data, dict):
            raise CacheCorruptionError(f"{where}: not a JSON object")
        if "schema_version" not in data:
            raise CacheCorruptionError(f"{where}: key schema_version is missing")
        version = str(data["schema_version"])
        major = version.split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise IncompatibleCacheError(
                f"{where}: schema_version {version} is not readable by this dflash-offline "
                f"(reads {SCHEMA_VERSION.split('.')[0]}.x); re-extract the cache or use a matching release")
        # Every key written since 1.0 is required and named when missing; keys of a newer minor are ignored.
        def known(kind, values, prefix):
            if not isinstance(values, dict):
                raise CacheCorruptionError(f"{where}: key {prefix.rstrip('.')} is not an object")
            names = [f.name for f in fields(kind)]
            missing = [n for n in names if n not in values]
            if missing:
                raise CacheCorruptionError(f"{where}: key {prefix}{missing[0]} is missing")
            return {n: values[n] for n in names}

        top = known(cls, data, "")
        top["target"] = TargetInfo(**known(TargetInfo, top["target"], "target."))
        top["storage"] = StorageInfo(**known(StorageInfo, top["storage"], "storage."))
        return cls(**top)

    def mismatches(self, other: "Manifest") -> list[str]:
        """Identity keys (dotted) whose values differ between two manifests."""
        mine, theirs = self.to_dict(), other.to_dict()
        out = []
        for key in self.IDENTITY:
            a, b = mine[key], theirs[key]
            if isinstance(a, dict):
                out += [f"{key}.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            elif a != b:
                out.append(key)
        return out


def check_compatible(existing: Manifest, wanted: Manifest, where: str) -> None:
    """Refuse, naming every differing identity key with both values, unless the two manifests agree."""
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


@dataclass
class Sample:
    """One conversation as the cache stores it. `hidden_TLH` is bf16 (fp8 caches decode to bf16)."""

    key: str
    input_ids: np.ndarray  # int32 [T]
    loss_mask: np.ndarray  # bool [T]
    position_ids: np.ndarray  # int32 [3, T]
    hidden_TLH: torch.Tensor  # bfloat16 [T, L, H]
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def check(self, num_layers: int, hidden_size: int) -> None:
        t = len(self)
        expect = {"loss_mask": (t,), "position_ids": (3, t), "hidden_TLH": (t, num_layers, hidden_size)}
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"sample {self.key}: {name} has shape {got}, expected {shape}")
