"""Structured config of the extract stage (filled by conf/extract.yaml and the `target/` group)."""

from dataclasses import dataclass, field, fields

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from cache_schema import StorageInfo
from cache_schema.layout import HIDDEN_DTYPES
from cache_schema.storage import compressors
from extract.prompts import GenerationSettings

GENERATORS = ("transformers", "vllm")  # what regenerates the answers (generation.engine)
CAPTURERS = ("transformers", "engine")  # what computes the hidden states (generation.capture)


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


DATA_FORMATS = ("auto", "llava", "messages")


@dataclass
class InputConfig:
    shards: str = MISSING  # brace pattern or comma-separated list of webdataset shards
    format: str = "auto"  # one of DATA_FORMATS


@dataclass
class GenerationConfig(GenerationSettings):
    """The generation settings (extract/prompts.py: what a prompt and its answer are, stored in the manifest)
    and how fast they are produced, which is left out of the manifest (padding changes kernel shapes, so a
    near-tie may rarely resolve otherwise: docs/decisions.md, "What is byte-for-byte")."""

    batch_size: int = 8
    # Conversations are read in windows of this many batches and sorted by text length before batching, so a
    # batch's rows pad little and do not wait long on one long answer (bench/extract_bench.py); 1: input order.
    sort_window: int = 8
    # Who writes the answers: "transformers" (the loaded target's generate) or "vllm" (a serving engine in its own
    # interpreter, before the target is loaded: extract/engine.py). Either answers greedily under the settings above.
    engine: str = "transformers"
    engine_python: str | None = None  # vLLM's interpreter; None: $DFLASH_VLLM_PYTHON or .venv-vllm
    engine_window: int = 256  # conversations the engine gets at once (each window is saved when answered)
    # Of each GPU for the engine; on the CPU build, of the machine's memory for its KV cache. None:
    # engines/vllm_client.py's MEMORY_FRACTION.
    engine_memory_fraction: float | None = None
    engine_tensor_parallel: int = 1  # GPUs of one rank's engine
    engine_max_images: int = 8  # images one prompt may hold
    # Who computes the cached hidden states: "transformers" (the target loaded here, one forward per sequence) or
    # "engine" (generation.engine's, started again for a capture prefill of every sequence; the target's weights are
    # never loaded here: extract/engine_capture.py).
    capture: str = "transformers"

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
        if self.data.format not in DATA_FORMATS:
            raise ValueError(f"data.format={self.data.format!r}; choose from {DATA_FORMATS}")
        if self.storage.hidden_dtype not in HIDDEN_DTYPES:
            raise ValueError(f"storage.hidden_dtype={self.storage.hidden_dtype!r}; choose from {HIDDEN_DTYPES}")
        compressors(self.storage.compression)
        if self.generation.engine not in GENERATORS:
            raise ValueError(f"generation.engine={self.generation.engine!r}; choose from {GENERATORS}")
        if self.generation.engine != "transformers" and not self.generation.regenerate:
            raise ValueError(f"generation.engine={self.generation.engine} regenerates; generation.regenerate=false "
                             "keeps the dataset's answers, so it takes no engine")
        if self.generation.capture not in CAPTURERS:
            raise ValueError(f"generation.capture={self.generation.capture!r}; choose from {CAPTURERS}")
        if self.generation.capture == "engine" and self.generation.engine == "transformers":
            raise ValueError("generation.capture=engine captures through the serving engine: set generation.engine "
                             f"(one of {GENERATORS[1:]})")
        fraction = self.generation.engine_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"generation.engine_memory_fraction={self.generation.engine_memory_fraction!r} must "
                             "lie in (0, 1]")
        self.generation.settings().check()
        counts = {"generation.batch_size": self.generation.batch_size,
                  "generation.sort_window": self.generation.sort_window,
                  "target.num_capture_layers": self.target.num_capture_layers,
                  "storage.chunk_tokens": self.storage.chunk_tokens, "threads": self.threads,
                  "generation.engine_window": self.generation.engine_window,
                  "generation.engine_tensor_parallel": self.generation.engine_tensor_parallel,
                  "generation.engine_max_images": self.generation.engine_max_images}
        for key, value in counts.items():
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{key}={value!r} must be an integer >= 1")


ConfigStore.instance().store(name="extract_schema", node=ExtractConfig)
