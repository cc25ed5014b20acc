"""Structured config of the train stage (filled by conf/train.yaml and the drafter/optim/data/setup groups)."""

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


@dataclass
class DrafterConfig:
    # Dimensions that must match the cache's target.
    hidden_size: int = MISSING
    vocab_size: int = MISSING
    target_layer_ids: list[int] = MISSING
    # The drafter's own architecture (Qwen3-style decoder layers).
    num_layers: int = 5
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 32768
    block_size: int = 16
    mask_token_id: int | None = None  # None: first unused vocabulary slot, len(cache tokenizer)
    position_source: str = "mrope_axis0"  # mrope_axis0 | sequential


@dataclass
class ObjectiveConfig:
    mode: str = "dflash"  # dflash | vp
    num_anchors: int = 512
    gamma: float | None = None  # None: 7 for B=16, 5 for B=10, 4 for B=8
    prefix_weight_base: float = 0.9  # vp: P(p) ~ base**p
    loss_chunk_rows: int = 2048  # query rows per chunk of the vocabulary projection
    draft_vocab_size: int | None = None  # None: full vocabulary; k: the k most frequent supervised tokens


@dataclass
class DataConfig:
    cache: str = MISSING
    eval_shards: int = 1  # the last k committed shards are held out for evaluation
    max_tokens_per_batch: int = 16384  # token budget of one batch (padded length x samples)
    max_length: int = 8192  # longer samples are skipped and counted
    num_workers: int = 2
    bucket_size: int = 64  # batches are formed from runs of this many samples sorted by length


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 100
    max_steps: int = 10000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = "runs/default"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500
    eval_batches: int = 20
    save_every: int = 1000
    keep_last: int = 3
    resume: str = "auto"  # auto | never | PATH of a checkpoint directory
    attention: str = "auto"  # auto (flex on CUDA, dense elsewhere) | flex | dense
    distributed: str = "ddp"  # ddp | fsdp
    progress: bool = True
    expect_target: str | None = None  # when set, the cache's target.name_or_path must equal it


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
