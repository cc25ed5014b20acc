"""The frozen target: loading by `model_type` (its record in extract/families.py), layer-id rules, hidden-state
capture hooks, head export.

Layer ids follow the z-lab/SpecForge convention: id `i` names the output of decoder layer `i`, which is
Hugging Face `output_hidden_states[i + 1]` (index 0 is the embedding output).
"""

import hashlib
import json
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from operator import attrgetter
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import AutoConfig, AutoProcessor, AutoTokenizer, GenerationConfig

from cache_schema.codecs import DTYPES
from extract.families import ChatMarkup, Family, family

log = logging.getLogger(__name__)

def default_layer_ids(num_layers: int, n: int, start: int = 1) -> list[int]:
    """`n` ids spread from `start` to L-3: round(start + k*(L-3-start)/(n-1)), rounding halves up."""
    if n == 1:
        return [start]
    end = num_layers - 3
    return [int(math.floor(start + k * (end - start) / (n - 1) + 0.5)) for k in range(n)]


def check_layer_ids(ids: list[int], num_layers: int, deepstack: int) -> None:
    if not ids:
        raise ValueError("target.layer_ids is empty")
    if len(set(ids)) != len(ids) or sorted(ids) != list(ids):
        raise ValueError(f"target.layer_ids={ids} must be strictly increasing")
    bad = [i for i in ids if not 0 <= i < num_layers - 1]
    if bad:
        raise ValueError(f"target.layer_ids={ids}: {bad} out of range; ids must lie in [0, {num_layers - 2}] for a "
                         f"{num_layers}-layer target (the last layer is never captured: HF applies the final norm "
                         "to it)")
    early = [i for i in ids if i < deepstack]
    if early:
        warnings.warn(f"target.layer_ids {early} lie in the deepstack layers 0..{deepstack - 1}, whose outputs mix "
                      "in visual features; ids from 3 up are the usual choice for Qwen3-VL", stacklevel=2)


# What a config says of how it was saved or loaded rather than of the model: a target loaded in bf16 from fp32 files
# is the same target (its sub-configs, text and vision, carry their own dtype).
NOT_THE_MODEL = ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures")


def config_fingerprint(config) -> str:
    def model_only(data):
        if isinstance(data, dict):
            return {k: model_only(v) for k, v in data.items() if k not in NOT_THE_MODEL}
        return data

    data = json.dumps(model_only(config.to_dict()), sort_keys=True, default=str)
    return hashlib.sha256(data.encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.chat_template or ""], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def special_token_ids(tokenizer, chat: ChatMarkup) -> dict[str, int]:
    """The ids the cache manifest records (the family's image, video and turn tokens, and the pad token) that
    this tokenizer has."""
    names = {**dict(chat.special_tokens), "pad_token_id": tokenizer.pad_token or chat.pad}
    return {k: t for k, v in names.items() if (t := token_id(tokenizer, v)) is not None}


@dataclass
class Target:
    model: torch.nn.Module
    processor: object  # the checkpoint's processor for vision families, the tokenizer for text ones
    tokenizer: object
    family: str  # the model_type
    name_or_path: str
    generation_config: object = None  # the checkpoint's; the model's own when None


    @property
    def traits(self) -> Family:
        return family(self.family)

    @property
    def is_vision(self) -> bool:
        return self.traits.vision

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.weight.device

    @property
    def decoder(self):
        """The module holding `layers`, `embed_tokens` and `norm` of the language model."""
        return attrgetter(self.traits.decoder)(self.model)

    @property
    def layers(self):
        return self.decoder.layers

    def token_id(self, token: str) -> int | None:
        return token_id(self.tokenizer, token)

    def token_ids(self, tokens) -> list[int]:
        """The ids of those of `tokens` this tokenizer has."""
        return [t for t in map(self.token_id, tokens) if t is not None]

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        return special_token_ids(self.tokenizer, self.traits.chat)

    @cached_property
    def suppressed_ids(self) -> list[int]:
        return self.token_ids(self.traits.chat.suppressed)

    @cached_property
    def eos_ids(self) -> list[int]:
        ids = (self.generation_config or self.model.generation_config).eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return sorted(set(ids) | set(self.token_ids([self.traits.chat.end_of_turn])))

    def head_tensors(self) -> dict[str, torch.Tensor]:
        if self.decoder.embed_tokens.weight.is_meta:  # an engine holds the weights: read from the checkpoint's files
            return checkpoint_head(self)
        return {"embed_tokens": self.decoder.embed_tokens.weight.detach(),
                "lm_head": attrgetter(self.traits.lm_head)(self.model).weight.detach(),
                "final_norm": self.decoder.norm.weight.detach()}

    @contextmanager
    def capture(self, layer_ids: list[int]):
        """Forward hooks on the chosen decoder layers; yields a dict id -> output filled by each forward."""
        captured: dict[int, torch.Tensor] = {}

        def hook(i):
            def fn(_module, _args, output):
                captured[i] = output[0] if isinstance(output, tuple) else output
            return fn

        handles = [self.layers[i].register_forward_hook(hook(i)) for i in layer_ids]
        try:
            yield captured
        finally:
            for h in handles:
                h.remove()

    def position_ids(self, batch: dict) -> torch.Tensor:
        """The target's own 3-axis position ids [3, B, T] (1-D RoPE targets: the 1-D positions on all three axes)."""
        ids = batch["input_ids"]
        if not self.traits.mrope:
            mask = batch.get("attention_mask", torch.ones_like(ids))
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            return pos[None].expand(3, -1, -1)
        pos, _ = attrgetter(self.traits.rope_index)(self.model)(
            ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch.get("attention_mask"))
        return pos


def load_processors(path: str, model_type: str | None = None) -> Target:
    """The target without its weights: what renders and encodes prompts (tokenizer, processor, chat markup,
    end-of-turn ids), for a serving engine that holds the model itself."""
    config = _checked_config(path, model_type)
    traits = family(config.model_type)
    try:
        generation = GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: transformers derives the model's from its config, as here
        generation = GenerationConfig.from_model_config(config)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path) if traits.vision else tokenizer
    return Target(model=None, processor=processor, tokenizer=tokenizer, family=traits.model_type,
                  name_or_path=str(path), generation_config=generation)


def load_structure(path: str, dtype: str = "bfloat16", model_type: str | None = None) -> Target:
    """The target as a serving engine captures it: its processors, and its model built on the meta device, no weight
    loaded (what extraction asks of it besides the states, the M-RoPE position rule, reads the config alone); the
    head tensors come from the checkpoint's files by name (`Target.head_tensors`)."""
    if dtype not in DTYPES:
        raise ValueError(f"target.dtype={dtype!r}; choose from {sorted(DTYPES)}")
    target = load_processors(path, model_type)
    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        target.model = getattr(transformers, target.traits.auto_class).from_config(config, dtype=DTYPES[dtype])
    target.model.eval().requires_grad_(False)
    return target


def checkpoint_head(target: Target) -> dict[str, torch.Tensor]:
    """The embedding, LM head and final norm read by their names in the model from the checkpoint's safetensors files
    (an LM head tied to the embedding is the embedding), in the target's dtype."""
    folder = Path(target.name_or_path)
    if not folder.is_dir():  # a hub id: the files of the local snapshot (HF_HUB_OFFLINE is honoured)
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(target.name_or_path, allow_patterns=["*.safetensors", "*.json"]))
    index = folder / "model.safetensors.index.json"
    where = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    traits, dtype = target.traits, target.model.dtype
    names = {"embed_tokens": f"{traits.decoder}.embed_tokens.weight", "lm_head": f"{traits.lm_head}.weight",
             "final_norm": f"{traits.decoder}.norm.weight"}
    out = {}
    for key, name in names.items():
        file = folder / (where.get(name, "") if where is not None else "model.safetensors")
        with safe_open(str(file), "pt") as f:
            if name in f.keys():
                out[key] = f.get_tensor(name).to(dtype)
    if "lm_head" not in out and target.model.config.get_text_config().tie_word_embeddings:
        out["lm_head"] = out.get("embed_tokens")
    missing = [names[k] for k in names if out.get(k) is None]
    if missing:
        raise ValueError(f"target {target.name_or_path}: its safetensors files hold no {', '.join(missing)}")
    return out


def _checked_config(path: str, model_type: str | None):
    if str(path).startswith(("/", ".", "~")) and not (Path(path).expanduser() / "config.json").is_file():
        raise ValueError(f"target {path}: no model directory there (no config.json)")
    config = AutoConfig.from_pretrained(path)
    traits = family(config.model_type)
    if model_type and model_type != traits.model_type:
        raise ValueError(f"target.model_type={model_type!r} but {path} is a {traits.model_type!r} model")
    return config


def load_target(path: str, dtype: str = "bfloat16", device: str | None = None, device_map: str | None = None,
                attn_implementation: str = "sdpa", model_type: str | None = None) -> Target:
    config = _checked_config(path, model_type)
    traits = family(config.model_type)
    if dtype not in DTYPES:
        raise ValueError(f"target.dtype={dtype!r}; choose from {sorted(DTYPES)}")
    auto = getattr(transformers, traits.auto_class)
    with torch.random.fork_rng(devices=[]):  # initialisation of what the weights overwrite draws from it
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], device_map=device_map,
                                     attn_implementation=attn_implementation)
    if device_map is None and device:
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path) if traits.vision else tokenizer
    log.info("loaded %s target %s (%d layers, hidden %d)", traits.model_type, path,
             config.get_text_config().num_hidden_layers, config.get_text_config().hidden_size)
    return Target(model=model, processor=processor, tokenizer=tokenizer, family=traits.model_type,
                  name_or_path=str(path))
