"""What the code knows about each target family: one frozen record per Hugging Face `model_type`.

Loading, prompts, spans, positions, capture, the head export, the manifest's special tokens, speculative
decoding and the serving export all read these records; nothing else names a family. docs/adding_a_target.md
says what a new family needs. It imports nothing, so that train/export.py may read it too.
"""

from dataclasses import dataclass

_IM_START, _IM_END = "<|im_start|>", "<|im_end|>"
_IMAGE, _VIDEO = "<|image_pad|>", "<|video_pad|>"
_VISION_START, _VISION_END = "<|vision_start|>", "<|vision_end|>"


@dataclass(frozen=True)
class ChatMarkup:
    """The chat template text and special tokens the code relies on (the rest of a template is its own)."""

    assistant_header: str  # opens an assistant turn; a generation prompt must open with it
    end_of_turn: str  # closes every turn: a stop token, and the last supervised token of an answer
    empty_think: str  # what a thinking template writes before an answer with no reasoning (not the model's)
    expanded: tuple[str, ...]  # placeholders the processor expands into one token per vision patch group
    special_tokens: tuple[tuple[str, str], ...]  # (manifest key, token) the cache manifest records
    pad: str  # the pad token when the tokenizer names none
    suppressed: tuple[str, ...]  # never generated: they would be read back as image slots or turn headers


QWEN_CHAT = ChatMarkup(
    assistant_header=_IM_START + "assistant\n", end_of_turn=_IM_END, empty_think="<think>\n\n</think>\n\n",
    expanded=(_IMAGE, _VIDEO),
    special_tokens=(("image_token_id", _IMAGE), ("video_token_id", _VIDEO), ("vision_start_token_id", _VISION_START),
                    ("im_start_id", _IM_START), ("im_end_id", _IM_END)),
    pad="<|endoftext|>", suppressed=(_IMAGE, _VIDEO, _VISION_START, _VISION_END, _IM_START))


@dataclass(frozen=True)
class Family:
    model_type: str
    auto_class: str  # the transformers Auto class, by name, whose from_pretrained loads the checkpoint
    vision: bool  # prompts carry images: content parts, rendered and encoded by the checkpoint's processor
    decoder: str  # dotted path from the loaded model to the module holding `layers`, `embed_tokens`, `norm`
    lm_head: str  # dotted path from the loaded model to the LM head
    rope_index: str | None  # dotted path to the model's 3-axis M-RoPE `get_rope_index`; None: 1-D RoPE
    deepstack_key: str | None  # vision_config field listing the deepstack layers (visual features added)
    # Some layers keep a recurrent and convolutional state (linear attention), which a rejected draft cannot be
    # cut out of; speculative decoding keeps their per-position states through verification instead.
    recurrent_state: bool
    chat: ChatMarkup

    @property
    def mrope(self) -> bool:
        return self.rope_index is not None

    def deepstack_layers(self, config) -> int:
        """The first this-many decoder layers add visual features to their outputs."""
        if self.deepstack_key is None:
            return 0
        return len(getattr(config.vision_config, self.deepstack_key, ()) or ())


def _qwen_vlm(model_type: str, deepstack_key: str | None, recurrent_state: bool) -> Family:
    return Family(model_type, "AutoModelForImageTextToText", vision=True, decoder="model.language_model",
                  lm_head="lm_head", rope_index="model.get_rope_index", deepstack_key=deepstack_key,
                  recurrent_state=recurrent_state, chat=QWEN_CHAT)


# Qwen3.5/3.6 interleave Gated DeltaNet (linear-attention) layers with a full-attention layer every few.
FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    _qwen_vlm("qwen3_vl", "deepstack_visual_indexes", recurrent_state=False),
    _qwen_vlm("qwen3_vl_moe", "deepstack_visual_indexes", recurrent_state=False),
    _qwen_vlm("qwen3_5", None, recurrent_state=True),
    _qwen_vlm("qwen3_5_moe", None, recurrent_state=True),
    Family("qwen3", "AutoModelForCausalLM", vision=False, decoder="model", lm_head="lm_head", rope_index=None,
           deepstack_key=None, recurrent_state=False, chat=QWEN_CHAT),
)}


def family(model_type: str) -> Family:
    """The record of `model_type`; a ValueError naming the supported ones for any other."""
    if model_type not in FAMILIES:
        raise ValueError(f"model_type {model_type!r} is not a supported target family; supported: "
                         f"{', '.join(FAMILIES)} (a new one is a record in extract/families.py: "
                         "docs/adding_a_target.md)")
    return FAMILIES[model_type]
