"""The frozen target: loading by `model_type`, layer-id rules, hidden-state capture hooks, head export.

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

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

log = logging.getLogger(__name__)

VISION_FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")
TEXT_FAMILIES = ("qwen3",)
# Tokens a generated answer must never contain: they would be read back as image slots or turn headers.
SUPPRESSED_TOKENS = ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def deepstack_layers(config) -> int:
    """Qwen3-VL adds visual features to the outputs of its first len(deepstack_visual_indexes) layers."""
    if config.model_type.startswith("qwen3_vl"):
        return len(getattr(config.vision_config, "deepstack_visual_indexes", ()) or ())
    return 0


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


def config_fingerprint(config) -> str:
    data = config.to_dict()
    for k in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        data.pop(k, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([vocab, tokenizer.chat_template or ""], ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_id(tokenizer, token: str) -> int | None:
    tid = tokenizer.convert_tokens_to_ids(token)
    return None if tid is None or tid == tokenizer.unk_token_id else tid


def special_token_ids(tokenizer) -> dict[str, int]:
    """The ids the cache manifest records (image, video, turn and pad tokens) that this tokenizer has."""
    names = {"image_token_id": "<|image_pad|>", "video_token_id": "<|video_pad|>",
             "vision_start_token_id": "<|vision_start|>", "im_start_id": "<|im_start|>",
             "im_end_id": "<|im_end|>", "pad_token_id": tokenizer.pad_token or "<|endoftext|>"}
    return {k: t for k, v in names.items() if (t := token_id(tokenizer, v)) is not None}


@dataclass
class Target:
    model: torch.nn.Module
    processor: object  # Qwen3VLProcessor for vision families, the tokenizer for text ones
    tokenizer: object
    family: str
    name_or_path: str

    @property
    def is_vision(self) -> bool:
        return self.family in VISION_FAMILIES

    @property
    def text_config(self):
        return self.model.config.get_text_config()

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def decoder(self):
        """The module holding `layers`, `embed_tokens` and `norm` of the language model."""
        inner = self.model.model
        return inner.language_model if self.is_vision else inner

    @property
    def layers(self):
        return self.decoder.layers

    def token_id(self, token: str) -> int | None:
        return token_id(self.tokenizer, token)

    @cached_property
    def special_tokens(self) -> dict[str, int]:
        return special_token_ids(self.tokenizer)

    @cached_property
    def eos_ids(self) -> list[int]:
        ids = self.model.generation_config.eos_token_id
        ids = [ids] if isinstance(ids, int) else list(ids or [])
        return sorted(set(ids) | {i for i in [self.token_id("<|im_end|>")] if i is not None})

    def head_tensors(self) -> dict[str, torch.Tensor]:
        return {"embed_tokens": self.model.get_input_embeddings().weight.detach(),
                "lm_head": self.model.get_output_embeddings().weight.detach(),
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
        """The target's own 3-axis position ids [3, B, T] (text targets: the 1-D positions on all three axes)."""
        ids = batch["input_ids"]
        if not self.is_vision:
            mask = batch.get("attention_mask", torch.ones_like(ids))
            pos = (mask.long().cumsum(-1) - 1).clamp_min(0)
            return pos[None].expand(3, -1, -1)
        pos, _ = self.model.model.get_rope_index(
            ids, mm_token_type_ids=batch["mm_token_type_ids"], image_grid_thw=batch.get("image_grid_thw"),
            video_grid_thw=batch.get("video_grid_thw"), attention_mask=batch.get("attention_mask"))
        return pos


def load_target(path: str, dtype: str = "bfloat16", device: str | None = None, device_map: str | None = None,
                attn_implementation: str = "sdpa", model_type: str | None = None) -> Target:
    config = AutoConfig.from_pretrained(path)
    family = config.model_type
    if family not in VISION_FAMILIES + TEXT_FAMILIES:
        raise ValueError(f"target {path}: model_type {family!r} is not supported; "
                         f"supported: {VISION_FAMILIES + TEXT_FAMILIES}")
    if model_type and model_type != family:
        raise ValueError(f"target.model_type={model_type!r} but {path} is a {family!r} model")
    if dtype not in DTYPES:
        raise ValueError(f"target.dtype={dtype!r}; choose from {sorted(DTYPES)}")
    auto = AutoModelForImageTextToText if family in VISION_FAMILIES else AutoModelForCausalLM
    with torch.random.fork_rng(devices=[]):  # initialisation of what the weights overwrite draws from it
        model = auto.from_pretrained(path, dtype=DTYPES[dtype], device_map=device_map,
                                     attn_implementation=attn_implementation)
    if device_map is None and device:
        model.to(device)
    model.eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path) if family in VISION_FAMILIES else tokenizer
    log.info("loaded %s target %s (%d layers, hidden %d)", family, path,
             config.get_text_config().num_hidden_layers, config.get_text_config().hidden_size)
    return Target(model=model, processor=processor, tokenizer=tokenizer, family=family, name_or_path=str(path))
