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

import re
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from cache_schema.codecs import CODECS, HiddenCodec

SCHEMA_VERSION = "1.1"
MANIFEST = "manifest.json"
HEAD_FILE = "target_head.safetensors"
SUMMARY = "summary.json"
TOKENIZER_DIR = "tokenizer"
SHARDS_DIR = "shards"
COMMIT_MARKER = "_COMMITTED.json"
CHECKSUMS = "checksums.json"
ZARR_METADATA = "zarr.json"  # of every shard group and array
LAYER_CONVENTION = "decoder-layer output; id i == hf output_hidden_states[i + 1]"
HIDDEN_DTYPES = tuple(CODECS)
# Token-axis arrays besides the hidden states: name -> (row shape, dtype).
TOKEN_ARRAYS = {"input_ids": ((), "int32"), "loss_mask": ((), "uint8"), "position_ids": ((3,), "int32")}
HEAD_TENSORS = ("embed_tokens", "lm_head", "final_norm")
# storage.compression -> the codec chain of the hidden states. Every chunk ends with a crc32c so that any flipped
# byte is caught on read, compressed or not.
COMPRESSIONS = {
    "none": lambda: [Crc32cCodec()],
    "zstd": lambda: [ZstdCodec(level=3), Crc32cCodec()],
    "blosc_lz4": lambda: [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()],
}


class CacheError(Exception):
    """Base class for problems with a cache on disk."""


class IncompatibleCacheError(CacheError, ValueError):
    """The cache was written by another schema, target or configuration than the one asked for."""


class CacheCorruptionError(CacheError):
    """Stored bytes do not match their checksums or the shard's own bookkeeping."""


# --- what the cache's JSON may hold ---------------------------------------------------------------------------
# A cache on disk may lie. Every JSON value it holds is checked against a schema here when read, so a wrong one
# is refused naming its file and dotted key instead of surfacing later as a TypeError deep inside a read.


def _join(key: str, name) -> str:
    return f"{key}.{name}" if key else str(name)


def _label(key: str) -> str:
    return f"key {key}" if key else "the top level"


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."  # a hostile value must not make the message huge


@dataclass(frozen=True)
class Rule:
    """A single value: `what` completes "must be ...", `ok` tells whether a value is one."""

    what: str
    ok: Callable[[Any], bool]

    def check(self, value, where: str, key: str = "") -> None:
        if not self.ok(value):
            raise CacheCorruptionError(f"{where}: {_label(key)} must be {self.what} (got {_shown(value)})")


@dataclass(frozen=True)
class Fields:
    """An object with these keys, each checked by its schema. Other keys are left alone, so that what a newer
    minor version adds reads."""

    required: dict
    optional: dict = field(default_factory=dict)

    def check(self, value, where: str, key: str = "") -> None:
        OBJECT.check(value, where, key)
        missing = [name for name in self.required if name not in value]
        if missing:
            raise CacheCorruptionError(f"{where}: key {_join(key, missing[0])} is missing")
        for name, schema in {**self.required, **self.optional}.items():
            if name in value:
                schema.check(value[name], where, _join(key, name))


@dataclass(frozen=True)
class Each:
    """An object of any keys (each a `names` where given), every value checked by `schema`."""

    schema: Any
    names: Rule | None = None

    def check(self, value, where: str, key: str = "") -> None:
        OBJECT.check(value, where, key)
        for name, item in value.items():
            if self.names is not None and not self.names.ok(name):
                raise CacheCorruptionError(f"{where}: {_label(key)} holds an entry named {_shown(name)}; entry "
                                           f"names must be {self.names.what}")
            self.schema.check(item, where, _join(key, name))


@dataclass(frozen=True)
class Items:
    """A list, every item checked by `schema`."""

    schema: Any

    def check(self, value, where: str, key: str = "") -> None:
        LIST.check(value, where, key)
        for i, item in enumerate(value):
            self.schema.check(item, where, f"{key}[{i}]")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_in(low: int, high: int, what: str) -> Rule:
    return Rule(what, lambda v: _is_int(v) and low <= v < high)


def one_of(names) -> Rule:
    return Rule(f"one of {', '.join(names)}", lambda v: isinstance(v, str) and v in names)


def matching(pattern: str, what: str) -> Rule:
    return Rule(what, lambda v: isinstance(v, str) and re.fullmatch(pattern, v) is not None)


OBJECT = Rule("an object", lambda v: isinstance(v, dict))
LIST = Rule("a list", lambda v: isinstance(v, list))
TEXT = Rule("a string", lambda v: isinstance(v, str))
COUNT = int_in(0, 2**63, "a non-negative integer below 2**63")  # counts and offsets are int64
SIZE = int_in(1, 2**31, "a positive integer below 2**31")  # token ids and array shapes are int32
VERSION = matching(r"[0-9]+\.[0-9]+", "a string MAJOR.MINOR of two integers")
RELATIVE_PATH = Rule("relative paths inside the cache", lambda v: all(p not in ("", ".", "..") for p in v.split("/")))

MARKER_SCHEMA = Fields({"samples": COUNT, "tokens": COUNT, "supervised_tokens": COUNT},
                       {"image_tokens": COUNT, "chunks": Each(COUNT), "skipped": Each(COUNT), "turns": Each(COUNT)})
SUMMARY_SCHEMA = Fields({}, {"shard_samples": Each(COUNT), "skipped": Each(COUNT)})
CHECKSUMS_SCHEMA = Each(matching("[0-9a-f]{64}", "a sha256 hex digest"), names=RELATIVE_PATH)
META_SCHEMA = Items(Fields({"key": TEXT}))  # the `meta` array of a shard: one object per sample
TARGET_SCHEMA = Fields({"name_or_path": TEXT, "model_type": TEXT, "num_hidden_layers": SIZE, "hidden_size": SIZE,
                        "vocab_size": SIZE, "fingerprint": TEXT})
STORAGE_SCHEMA = Fields({"hidden_dtype": one_of(HIDDEN_DTYPES), "chunk_tokens": SIZE,
                         "compression": one_of(tuple(COMPRESSIONS))})


def manifest_schema(target: dict) -> Fields:
    """The manifest's keys, its layer and token ids bounded by its `target` (already checked)."""
    top = target["num_hidden_layers"] - 2  # the last layer is never captured: HF applies the final norm to it
    layer_ids = Rule(f"a non-empty strictly increasing list of integers in [0, {top}]",
                     lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(i) and 0 <= i <= top for i in v)
                     and all(a < b for a, b in zip(v, v[1:])))
    vocab = target["vocab_size"]
    return Fields({"schema_version": VERSION, "target": TARGET_SCHEMA, "target_layer_ids": layer_ids,
                   "storage": STORAGE_SCHEMA, "tokenizer_fingerprint": TEXT, "generation": OBJECT,
                   "special_tokens": Each(int_in(0, vocab, f"a token id in [0, {vocab})")), "layer_convention": TEXT})


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
    def from_dict(cls, data, where: str = "manifest") -> "Manifest":
        """A manifest read from JSON, every key checked (`manifest_schema`); keys of a newer minor are ignored."""
        Fields({"schema_version": VERSION}).check(data, where)
        major = data["schema_version"].split(".")[0]
        if major != SCHEMA_VERSION.split(".")[0]:
            raise IncompatibleCacheError(
                f"{where}: schema_version {data['schema_version']} is not readable by this dflash-offline "
                f"(reads {SCHEMA_VERSION.split('.')[0]}.x); re-extract the cache or use a matching release")
        Fields({"target": TARGET_SCHEMA}).check(data, where)
        schema = manifest_schema(data["target"])
        schema.check(data, where)
        top = {name: data[name] for name in schema.required}
        top["target"] = TargetInfo(**{name: top["target"][name] for name in TARGET_SCHEMA.required})
        top["storage"] = StorageInfo(**{name: top["storage"][name] for name in STORAGE_SCHEMA.required})
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
