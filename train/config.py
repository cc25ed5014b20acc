"""Structured config of the train stage (filled by conf/train.yaml and the drafter/optim/data/setup groups).

Every default lives here, once; YAML files state only what differs from it.
"""

from dataclasses import dataclass, field

from accelerate.tracking import get_available_trackers
from accelerate.utils import LoggerType
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

# sequential: token index, what SGLang and vLLM's default runner feed; mrope_axis0: vLLM's V1 runner only;
# mixed (training only): each sample drawn from one of the two, so that the drafter takes either when served.
POSITION_SOURCES = ("sequential", "mrope_axis0", "mixed")
SERVED_POSITION_SOURCES = POSITION_SOURCES[:2]


def served_position_source(trained: str) -> str:
    """The positions a drafter is replayed and decoded with unless told otherwise: what it was trained with, and
    for a mixed drafter the token index, which SGLang and vLLM's default runner feed."""
    return "sequential" if trained == "mixed" else trained


# dflash: the DFlash backbone; dflash2: plus grouped dynamic convolutions around every sublayer and a candidate
# selector over the head's top-k (DFlash2).
ARCHITECTURES = ("dflash", "dflash2")
MODES = ("dflash", "vp")
# decay: exp(-(k - p) / gamma) per slot; dpace: weights from the drafter's own confidence (D-PACE).
WEIGHTINGS = ("decay", "dpace")
NORMALIZERS = ("weight", "slots")
ATTENTION = ("auto", "flex", "dense")


def check_choice(key: str, value, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{key}={value!r}; choose {', '.join(choices[:-1])} or {choices[-1]}")


@dataclass
class DrafterConfig:
    # The target's dimensions: None reads them from the cache; a stated value must agree with it.
    hidden_size: int | None = None
    vocab_size: int | None = None
    target_layer_ids: list[int] | None = None
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
    position_source: str = "sequential"  # one of POSITION_SOURCES
    architecture: str = "dflash"  # one of ARCHITECTURES; the settings below are DFlash2's (published values)
    conv_kernel_size: int = 2  # causal taps of the convolutions, within a block (<= block_size)
    conv_group_size: int = 16  # channels sharing one dynamic coefficient (divides hidden_size)
    selector_rank: int = 256  # width of the selector's low-rank transition score
    selector_top_k: int = 16  # candidates per slot: the unary logits' top-k
    output_multiplier: float = 1.0  # unary logits = softcap(output_multiplier * head(h))
    final_logit_softcapping: float | None = None  # c: logits -> c * tanh(logits / c); None: no capping


@dataclass
class ObjectiveConfig:
    mode: str = "dflash"  # dflash | vp
    num_anchors: int = 512
    weighting: str = "decay"  # one of WEIGHTINGS
    gamma: float | None = None  # weighting=decay: None picks 7 for B=16, 5 for B=10, 4 for B=8; inf: no decay
    dpace_alpha: float = 0.5  # weighting=dpace: each slot's confidence is smoothed to (1 - alpha) q + alpha
    # weight: divide by the step's summed slot weights (a weighted mean of CE); slots: by its scored slots
    normalizer: str = "weight"
    # DFlash2's selector loss: weight 0 for the first `selector_warmup` of the run's steps, a linear ramp over the
    # next `selector_ramp`, then `selector_alpha` (0 freezes the selector); stop_gradient keeps the selector's loss
    # out of the backbone.
    selector_alpha: float = 1.0
    selector_warmup: float = 0.0
    selector_ramp: float = 0.0
    selector_stop_gradient: bool = False
    prefix_weight_base: float = 0.9  # vp: P(p) ~ base**p
    loss_chunk_rows: int = 2048  # query rows per chunk of the vocabulary projection
    draft_vocab_size: int | None = None  # None: full vocabulary; k: the k most frequent supervised tokens


@dataclass
class CacheSource:
    """One cache of a mixture (data.caches)."""

    url: str = MISSING
    # Each epoch takes the cache's training samples `weight` times; a fraction is a fresh random subset per epoch.
    weight: float = 1.0
    name: str | None = None  # in metric names (eval/tau_replay/NAME); None: the last component of the url


@dataclass
class DataConfig:
    cache: str | None = None  # one cache, the same as caches=[{url: ...}]
    caches: list[CacheSource] = field(default_factory=list)  # several caches of one target, mixed by weight
    eval_shards: int = 1  # the last k committed shards of each cache are held out for evaluation
    max_tokens_per_batch: int = 16384  # token budget of one batch (padded length x samples)
    max_length: int = 8192  # longer samples are skipped and counted
    num_workers: int = 8  # bench/train_bench.py: 8 workers feed a 30B-A3B-shaped drafter step 3.3x on an H100
    bucket_size: int = 64  # batches are formed from runs of this many samples sorted by length
    accept_flagged_layers: bool = False  # train on a cache whose audit found a dead or non-finite layer

    def sources(self) -> list[CacheSource]:
        """The caches to train from, each named (data.cache is a mixture of one)."""
        listed = [CacheSource(url=self.cache)] if self.cache is not None else self.caches
        return [CacheSource(c.url, c.weight, c.name or c.url.rstrip("/").rsplit("/", 1)[-1]) for c in listed]


@dataclass
class OptimConfig:
    lr: float = 6e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 200
    warmup_ratio: float | None = None  # when set, warmup is this fraction of the run's steps (warmup_steps ignored)
    max_steps: int = 20000
    epochs: int | None = None  # when set, the run is this many passes over the training samples (max_steps ignored)
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1


@dataclass
class TrainConfig:
    drafter: DrafterConfig = field(default_factory=DrafterConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run_dir: str = MISSING  # conf/train.yaml: runs/SETUP, one directory per job in -m sweeps
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500  # and at the last step
    eval_batches: int = 20
    eval_replay_samples: int = 16  # held-out samples per cache replayed for eval/tau_replay; 0: no replay
    early_stop_patience: int = 0  # stop after this many evaluations without a better eval/tau_replay; 0: never
    save_every: int = 1000
    nonfinite_patience: int = 20  # stop after this many steps in a row skipped for a non-finite gradient; 0: never
    keep_last: int = 3  # step checkpoints kept; RUN/best (the best by eval/tau_replay) is kept apart
    resume: str = "auto"  # auto | never | PATH of a checkpoint directory
    attention: str = "auto"  # auto (flex on CUDA, dense elsewhere) | flex | dense
    progress: bool = True
    expect_target: str | None = None  # when set, the cache's target.name_or_path must equal it
    threads: int | None = None  # intra-op CPU threads of every rank; None: torch's default (docs/decisions.md)
    log_with: list[str] = field(default_factory=list)  # experiment trackers beside metrics.jsonl (TRACKERS)
    tracker_project: str = "dflash-offline"  # project (W&B, trackio), experiment (MLflow), folder (TensorBoard)


# DFlash's decay per block size (the published Qwen3-VL-30B-A3B recipe, SpecForge PR #585: B=8, gamma 4); other
# sizes scale 7 * B / 16.
GAMMA_BY_BLOCK = {16: 7.0, 10: 5.0, 8: 4.0}


def resolve_gamma(gamma: float | None, block: int) -> float:
    """`None` picks the block size's default; `inf` turns the decay off (every scored slot weighs 1)."""
    if gamma is None:
        return GAMMA_BY_BLOCK.get(block, 7.0 * block / 16)
    if not gamma > 0:
        raise ValueError(f"objective.gamma={gamma} must be > 0 (null: the default for the block size, inf: no "
                         "decay)")
    return float(gamma)


TRACKERS = tuple(t.value for t in LoggerType if t is not LoggerType.ALL)


def check_trackers(names: list[str]) -> None:
    """Refuse a tracker accelerate does not know or whose package is missing (accelerate would drop it silently)."""
    installed = {str(t) for t in get_available_trackers()}
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"log_with: {name!r} is not a tracker; choose from {', '.join(TRACKERS)}")
        if name not in installed:
            raise ValueError(f"log_with: {name!r} is not installed in this environment (installed: "
                             f"{', '.join(sorted(installed)) or 'none'}); install its package or drop it")


# Keys that count something (>= 1) and keys that may be 0 to switch something off (>= 0).
POSITIVE_KEYS = ("drafter.num_layers", "drafter.num_attention_heads", "drafter.num_key_value_heads",
                 "drafter.head_dim", "drafter.intermediate_size", "objective.num_anchors",
                 "objective.loss_chunk_rows", "data.max_tokens_per_batch", "data.max_length", "data.bucket_size",
                 "optim.max_steps", "optim.grad_accum", "log_every", "eval_batches")
NON_NEGATIVE_KEYS = ("data.num_workers", "data.eval_shards", "optim.warmup_steps", "eval_every", "save_every",
                     "keep_last", "eval_replay_samples", "early_stop_patience", "nonfinite_patience")


def _get(cfg, key: str):
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def validate(cfg: TrainConfig) -> None:
    """Refuse settings that cannot work, naming the key, before anything is loaded."""
    for keys, low in ((POSITIVE_KEYS, 1), (NON_NEGATIVE_KEYS, 0)):
        for key in keys:
            if _get(cfg, key) < low:
                raise ValueError(f"{key}={_get(cfg, key)} must be >= {low}")
    if cfg.threads is not None and cfg.threads < 1:
        raise ValueError(f"threads={cfg.threads} must be >= 1 (null: torch's default)")
    validate_data(cfg.data)
    o = cfg.optim
    if o.epochs is not None and o.epochs < 1:
        raise ValueError(f"optim.epochs={o.epochs} must be >= 1 (null: optim.max_steps decides)")
    if o.warmup_ratio is not None and not 0 <= o.warmup_ratio < 1:
        raise ValueError(f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1) (null: optim.warmup_steps decides)")
    if cfg.early_stop_patience and not (cfg.eval_every and cfg.eval_replay_samples):
        raise ValueError(f"early_stop_patience={cfg.early_stop_patience} needs evaluations that replay tau: set "
                         "eval_every and eval_replay_samples above 0")
    check_trackers(cfg.log_with)
    d = cfg.drafter
    if d.block_size < 2:
        raise ValueError(f"drafter.block_size={d.block_size} must be >= 2 (slot 0 holds the verified token)")
    if d.num_attention_heads % d.num_key_value_heads:
        raise ValueError(f"drafter.num_attention_heads={d.num_attention_heads} must be a multiple of "
                         f"drafter.num_key_value_heads={d.num_key_value_heads}")
    check_choice("drafter.position_source", d.position_source, POSITION_SOURCES)
    if not 0 < d.partial_rotary_factor <= 1:
        raise ValueError(f"drafter.partial_rotary_factor={d.partial_rotary_factor} must be in (0, 1]")
    check_choice("objective.mode", cfg.objective.mode, MODES)
    validate_objective(cfg.objective)
    validate_architecture(d, vocab_size=d.vocab_size)
    resolve_gamma(cfg.objective.gamma, d.block_size)
    check_choice("attention", cfg.attention, ATTENTION)


def validate_objective(o: ObjectiveConfig) -> None:
    check_choice("objective.weighting", o.weighting, WEIGHTINGS)
    check_choice("objective.normalizer", o.normalizer, NORMALIZERS)
    if not 0 <= o.dpace_alpha <= 1:
        raise ValueError(f"objective.dpace_alpha={o.dpace_alpha} must be in [0, 1]")
    if not o.selector_alpha >= 0:
        raise ValueError(f"objective.selector_alpha={o.selector_alpha} must be >= 0 (0 freezes the selector)")
    for key in ("selector_warmup", "selector_ramp"):
        if not 0 <= getattr(o, key) <= 1:
            raise ValueError(f"objective.{key}={getattr(o, key)} must be a fraction of the run's steps, in [0, 1]")


def validate_architecture(d: DrafterConfig, vocab_size: int | None, draft_vocab_size: int | None = None) -> None:
    """DFlash2's settings against the block, the hidden size and the vocabulary (those known so far: the cache
    fills in the target's dimensions later, and this runs again then)."""
    check_choice("drafter.architecture", d.architecture, ARCHITECTURES)
    if d.architecture != "dflash2":
        if d.output_multiplier != 1 or d.final_logit_softcapping is not None:
            raise ValueError("drafter.output_multiplier and drafter.final_logit_softcapping shape DFlash2's unary "
                             "logits; set drafter.architecture=dflash2 or leave them at 1 and null")
        return
    if not 1 <= d.conv_kernel_size <= d.block_size:
        raise ValueError(f"drafter.conv_kernel_size={d.conv_kernel_size} must be in [1, drafter.block_size="
                         f"{d.block_size}]: the convolution never reaches across a block")
    if d.conv_group_size < 1 or (d.hidden_size is not None and d.hidden_size % d.conv_group_size):
        raise ValueError(f"drafter.conv_group_size={d.conv_group_size} must divide the hidden size "
                         f"{d.hidden_size}")
    if d.selector_rank < 1:
        raise ValueError(f"drafter.selector_rank={d.selector_rank} must be >= 1")
    for name, size in (("the vocabulary", vocab_size), ("the draft vocabulary", draft_vocab_size)):
        if size is not None and not 1 <= d.selector_top_k <= size:
            raise ValueError(f"drafter.selector_top_k={d.selector_top_k} must be in [1, {size}] ({name})")
    if d.selector_top_k < 1:
        raise ValueError(f"drafter.selector_top_k={d.selector_top_k} must be >= 1")
    if d.final_logit_softcapping is not None and not d.final_logit_softcapping > 0:
        raise ValueError(f"drafter.final_logit_softcapping={d.final_logit_softcapping} must be > 0 (null: none)")
    if not d.output_multiplier > 0:
        raise ValueError(f"drafter.output_multiplier={d.output_multiplier} must be > 0")


def validate_data(data: DataConfig) -> None:
    if (data.cache is None) == (not data.caches):
        raise ValueError("data.cache=URL or data.caches=[{url: URL, weight: W}, ...]: set exactly one of them")
    sources = data.sources()
    for i, c in enumerate(sources):
        if not c.weight > 0:
            raise ValueError(f"data.caches[{i}].weight={c.weight} must be > 0")
    names = [c.name for c in sources]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"data.caches: more than one cache is named {twice[0]!r}; give each a distinct name")


SECTIONS = {"drafter": DrafterConfig, "objective": ObjectiveConfig, "data": DataConfig, "optim": OptimConfig}


def from_dict(data: dict, where: str) -> TrainConfig:
    """A resolved train config (a checkpoint's config.json) back into its dataclasses; keys a checkpoint
    predates keep their defaults, a key this version does not know is refused by name."""
    try:
        parts = {name: kind(**data.get(name, {})) for name, kind in SECTIONS.items()}
        parts["data"].caches = [CacheSource(**c) for c in parts["data"].caches]
        return TrainConfig(**parts, **{k: v for k, v in data.items() if k not in SECTIONS})
    except TypeError as e:
        raise ValueError(f"{where}: not a train config of this version ({e})") from e


ConfigStore.instance().store(name="train_schema", node=TrainConfig)
