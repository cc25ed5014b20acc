"""Structured config of the extract stage (filled by conf/extract.yaml and the `target/` group)."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cache_schema import StorageInfo


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
    system_prompt: str | None = None
    enable_thinking: bool | None = None  # None: the chat template's default


@dataclass
class DataConfig:
    shards: str = MISSING  # brace pattern or comma-separated list of webdataset shards
    format: str = "auto"  # auto | llava | messages
    max_length: int = 4096  # samples longer than this (prompt or final) are skipped and counted


@dataclass
class GenerationConfig:
    regenerate: bool = True  # false keeps the dataset's own answers
    max_new_tokens: int = 1024
    batch_size: int = 8


@dataclass
class ExtractConfig:
    out: str = MISSING  # cache path or fsspec URL
    target: TargetConfig = field(default_factory=TargetConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    storage: StorageInfo = field(default_factory=StorageInfo)  # hidden_dtype bf16 | fp8_e4m3, compression, chunk_tokens
    strict: bool = False  # stop at the first bad sample instead of skipping it
    progress: bool = True
    seed: int = 0


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)
