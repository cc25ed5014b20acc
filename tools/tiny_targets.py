"""Build small random-weight targets of every supported family from the real transformers classes.

Each target is a directory that loads with `from_pretrained` / `AutoProcessor.from_pretrained`, so tests and
the demo exercise the same code path as a real checkpoint. Output is deterministic for a given seed.

    python -m tools.tiny_targets OUT_DIR [--families qwen3_vl qwen3 ...] [--template qwen3_vl_thinking]
"""

import argparse
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen3VLProcessor,
    Qwen3VLVideoProcessor,
)

from tools.corpus import training_text

FAMILIES = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe", "qwen3")
VISION_FAMILIES = FAMILIES[:4]
BPE_VOCAB = 640
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
THINK_TOKENS = ["<think>", "</think>"]

# Chat templates written here, one per real template family, that behave as the published ones do wherever it
# matters for loss masks (checked against the Qwen3-8B, Qwen3-VL Instruct/Thinking and Qwen3.5 templates):
# - qwen3_vl (Qwen3-VL Instruct): content as given, generation prompt "<|im_start|>assistant\n".
# - qwen3 (Qwen3): reasoning ("...</think>") is cut from assistant turns before the last user message; the
#   last answer gets a think block, "<think>\n\n</think>\n\n" when it has no reasoning, and loses leading
#   newlines; enable_thinking=false adds that empty block to the generation prompt.
# - qwen3_vl_thinking (Qwen3-VL Thinking): as qwen3, with vision parts; the generation prompt always opens the
#   think block ("<think>\n"); no enable_thinking switch.
# - qwen3_5 (Qwen3.5): every message's text is trimmed; an answer after the last user message always gets a
#   think block; the generation prompt ends with "<think>\n", or the empty block when enable_thinking=false.
_PARTS = """{%- macro text_of(content) -%}
{%- if content is string -%}{{ content }}
{%- else -%}{%- for part in content -%}
{%- if part.type == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>
{%- elif part.type == 'video' -%}<|vision_start|><|video_pad|><|vision_end|>
{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}
{%- endfor -%}{%- endif -%}
{%- endmacro -%}
{%- set last = namespace(user=-1) -%}
{%- for m in messages -%}{%- if m.role == 'user' -%}{%- set last.user = loop.index0 -%}{%- endif -%}{%- endfor -%}
"""
_LOOP = """{%- for m in messages -%}
{%- set text = TEXT -%}
{%- if m.role == 'assistant' -%}{{- '<|im_start|>assistant\\n' -}}ASSISTANT{{- '<|im_end|>\\n' -}}
{%- else -%}{{- '<|im_start|>' + m.role + '\\n' + text + '<|im_end|>\\n' -}}{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}GENERATION{%- endif -%}"""
# Reasoning and answer of an assistant turn, the way the Qwen thinking templates split them.
_SPLIT = """{%- set thought = '' -%}{%- set answer = text -%}
{%- if '</think>' in text -%}
{%- set thought = text.split('</think>')[0].split('<think>')[-1].strip('\\n') -%}
{%- set answer = text.split('</think>')[-1].lstrip('\\n') -%}
{%- endif -%}"""
_THINK = "{{- '<think>\\n' + thought + '\\n</think>\\n\\n' + answer.lstrip('\\n') -}}"
_SWITCH = ("{%- if enable_thinking is defined and enable_thinking is false -%}{{- '<think>\\n\\n</think>\\n\\n' -}}"
           "{%- else -%}OTHERWISE{%- endif -%}")
_VARIANTS = {
    "qwen3_vl": dict(TEXT="text_of(m.content)", ASSISTANT="{{- text -}}", GENERATION=""),
    "qwen3": dict(TEXT="text_of(m.content)",
                  ASSISTANT=_SPLIT + "{%- if loop.index0 > last.user and (loop.last or thought) -%}" + _THINK
                  + "{%- else -%}{{- answer -}}{%- endif -%}",
                  GENERATION=_SWITCH.replace("OTHERWISE", "")),
    "qwen3_vl_thinking": dict(TEXT="text_of(m.content)",
                              ASSISTANT=_SPLIT + "{%- if loop.index0 > last.user and (loop.last or thought) -%}"
                              + _THINK + "{%- else -%}{{- answer -}}{%- endif -%}",
                              GENERATION="{{- '<think>\\n' -}}"),
    "qwen3_5": dict(TEXT="text_of(m.content) | trim",
                    ASSISTANT=_SPLIT + "{%- if loop.index0 > last.user -%}" + _THINK
                    + "{%- else -%}{{- answer -}}{%- endif -%}",
                    GENERATION=_SWITCH.replace("OTHERWISE", "{{- '<think>\\n' -}}")),
}
TEMPLATES = tuple(_VARIANTS)
FAMILY_TEMPLATE = {"qwen3_vl": "qwen3_vl", "qwen3_vl_moe": "qwen3_vl", "qwen3_5": "qwen3_5",
                   "qwen3_5_moe": "qwen3_5", "qwen3": "qwen3"}


def chat_template(name: str) -> str:
    """The chat template of a template variant (`TEMPLATES`) or of a family's default variant."""
    variant = _VARIANTS[FAMILY_TEMPLATE.get(name, name)]
    loop = _LOOP
    for key, value in variant.items():
        loop = loop.replace(key, value)
    return _PARTS + loop


def build_tokenizer(corpus: list[str] | None = None, vocab: int = BPE_VOCAB) -> Qwen2Tokenizer:
    """Byte-level BPE trained on `corpus` (default: the toy corpus), with the Qwen pre-tokenizer and specials."""
    reference = Qwen2Tokenizer()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = reference.backend_tokenizer.pre_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(training_text() if corpus is None else corpus, trainer=trainer)
    state = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in state["merges"]]
    tok = Qwen2Tokenizer(vocab=state["vocab"], merges=merges)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[1:]})
    tok.add_tokens(THINK_TOKENS)
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    return tok


def padded_vocab(tok) -> int:
    # Leave unused slots after the tokenizer's ids, as real Qwen checkpoints do: the mask token lives there.
    return (len(tok) + 16 + 63) // 64 * 64


def _vision_config(family: str, text_hidden: int) -> dict:
    cfg = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=text_hidden,
               num_position_embeddings=64)
    if family.startswith("qwen3_vl"):
        cfg["deepstack_visual_indexes"] = [0, 1]
    return cfg


def _text_config(family: str, vocab: int, special: dict) -> dict:
    cfg = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096,
               rms_norm_eps=1e-6, tie_word_embeddings=False, **special)
    if family in ("qwen3_vl", "qwen3_vl_moe"):
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5_000_000.0,
                                  "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    elif family in ("qwen3_5", "qwen3_5_moe"):
        # partial_rotary_factor 0.25 of head_dim 32 -> 8 rotary dims -> 4 frequency pairs split over 3 axes.
        cfg.update(head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=16,
                   linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=4)
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 10_000_000.0,
                                  "partial_rotary_factor": 0.25, "mrope_section": [2, 1, 1],
                                  "mrope_interleaved": True}
    else:
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1_000_000.0}
    if family.endswith("_moe"):
        cfg.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
        if family == "qwen3_5_moe":
            cfg["shared_expert_intermediate_size"] = 32
    return cfg


def build_config(family: str, tok, text_overrides: dict | None = None):
    """The family's tiny config for `tok`; `text_overrides` replace language-model fields (the vision tower's
    output width follows the text hidden size)."""
    vocab = padded_vocab(tok)
    special = dict(eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
                   pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"))
    text = {**_text_config(family, vocab, special), **(text_overrides or {})}
    if family == "qwen3":
        return AutoConfig.for_model("qwen3", **text)
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in [
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>")]}
    return AutoConfig.for_model(family, text_config=text,
                                vision_config=_vision_config(family, text["hidden_size"]),
                                tie_word_embeddings=False, **ids)


def build_processor(family: str, tok, template: str | None = None):
    """The family's tokenizer (text) or processor (vision) carrying `template` (default: the family's own)."""
    tok.chat_template = chat_template(template or family)
    if family not in VISION_FAMILIES:
        return tok
    pixels = dict(shortest_edge=32 * 32, longest_edge=128 * 128)
    image = Qwen2VLImageProcessor(size=pixels, patch_size=16, temporal_patch_size=2, merge_size=2)
    video = Qwen3VLVideoProcessor(size=pixels, patch_size=16, temporal_patch_size=2, merge_size=2)
    return Qwen3VLProcessor(image_processor=image, tokenizer=tok, video_processor=video,
                            chat_template=tok.chat_template)


def build_target(family: str, out_dir: Path, seed: int = 0, template: str | None = None) -> Path:
    """Write one tiny target of `family` to `out_dir/family` (`out_dir/family-template` with a chat template
    other than the family's own) and return that path."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
    if template is not None and template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose from {TEMPLATES}")
    own = template in (None, FAMILY_TEMPLATE[family])
    path = Path(out_dir) / (family if own else f"{family}-{template}")
    tok = build_tokenizer()
    config = build_config(family, tok)
    auto = AutoModelForCausalLM if family == "qwen3" else AutoModelForImageTextToText
    with torch.random.fork_rng(devices=[]):  # seeded, and the caller's global RNG left as it was
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32)
        # Random init at std 0.02 gives near-uniform logits; a larger scale makes greedy outputs vary by input,
        # so regeneration tests compare real decisions rather than ties.
        # A larger end-of-turn row makes the tiny targets stop by themselves at varied lengths, so regeneration
        # exercises both the stop and the truncation paths.
        with torch.no_grad():
            model.get_input_embeddings().weight.normal_(0.0, 1.0)
            model.get_output_embeddings().weight[tok.convert_tokens_to_ids("<|im_end|>")] *= 3.0
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    model.save_pretrained(path)
    build_processor(family, tok, template).save_pretrained(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--template", choices=TEMPLATES, help="chat template variant (default: each family's own)")
    args = parser.parse_args()
    for family in args.families:
        print(f"{family}: {build_target(family, args.out_dir, args.seed, args.template)}")


if __name__ == "__main__":
    main()
