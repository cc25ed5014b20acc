"""Structured config of the extract stage (filled by conf/extract.yaml and the `target/` group)."""

from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cache_schema import StorageInfo
from cache_schema.layout import HIDDEN_DTYPES
from cache_schema.storage import compressors
from extract.prompts import GenerationSettings


@dataclass
class TargetConfig:
    path: str = MISSING  # local directory or hub id
    model_type: str | None = None  # when set, must match the checkpoint's config
    layer_ids: list[int] | None = None  # None: the default spread of num_capture_layers ids
    num_capture_layers: int = 5
    dtype: str = "bfloat16"
    device: str | None = None  # None: the accelerate process's device
    device_map: str | None = None  # e.g. "auto" to split a large target over the visible GPUs
    attn_implementation: str = "sdpa"


FORMATS = ("auto", "llava", "messages")


@dataclass
class InputConfig:
    shards: str = MISSING  # brace pattern or comma-separated list of webdataset shards
    format: str = "auto"  # one of FORMATS


@dataclass
class GenerationConfig(GenerationSettings):
    """The generation settings (extract/prompts.py: what a prompt and its answer are, stored in the manifest)
    and how fast they are produced, which is left out of the manifest (padding changes kernel shapes, so a
    near-tie may rarely resolve otherwise: docs/decisions.md, "What is byte-for-byte")."""

    batch_size: int = 8
    # Conversations are read in windows of this many batches and sorted by text length before batching, so a
    # batch's rows pad little and do not wait long on one long answer (bench/extract_bench.py); 1: input order.
    sort_window: int = 8

    def settings(self) -> GenerationSettings:
        return GenerationSettings(**{f.name: getattr(self, f.name) for f in fields(GenerationSettings)})


@dataclass
class ExtractConfig:
    out: str = MISSING  # cache path or fsspec URL
    target: TargetConfig = field(default_factory=TargetConfig)
    data: InputConfig = field(default_factory=InputConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    storage: StorageInfo = field(default_factory=StorageInfo)  # hidden_dtype bf16 | fp8_e4m3, compression, chunk_tokens
    strict: bool = False  # stop at the first bad sample or broken input shard instead of counting it
    progress: bool = True
    threads: int | None = None  # intra-op CPU threads of every rank; None: torch's default (see docs/decisions.md)

    def validate(self) -> None:
        """Refuse a mistaken setting by its key, before anything is loaded or written."""
        if self.data.format not in FORMATS:
            raise ValueError(f"data.format={self.data.format!r}; choose from {FORMATS}")
        if self.storage.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"storage.hidden_dtype={self.storage.hidden_dtype!r}; choose from {HIDDEN_DTYPES}")
        compressors(self.storage.compression)
        self.generation.settings().check()
        counts = {"generation.batch_size": self.generation.batch_size,
                  "generation.sort_window": self.generation.sort_window,
                  "target.num_capture_layers": self.target.num_capture_layers,
                  "storage.chunk_tokens": self.storage.chunk_tokens, "threads": self.threads}
        for key, value in counts.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}={value!r} must be an integer >= 1")


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)
