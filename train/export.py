"""Export a trained drafter to the layouts serving engines load unmodified.

    python -m train.export CKPT --format speculators|dflash --out DIR [--cache URL] [--dtype bfloat16]

speculators  vLLM's format (`vllm serve DIR` detects it): config.json with `speculators_model_type: dflash`, a
             Qwen3 `transformer_layer_config`, `aux_hidden_state_layer_ids` = target_layer_ids + 1;
             model.safetensors with the drafter's weights, plus `lm_head`, `d2t`, `t2d` for a reduced vocabulary.
dflash       the original DFlash layout (SGLang, the z-lab code): a Qwen3 config.json with `dflash_config`
             {mask_token_id, target_layer_ids}, `block_size`, `num_target_layers`, `auto_map` to the
             modeling_dflash.py written beside it (train/hf_dflash.py); the drafter's weights only.

Every setting an engine would silently read differently from training is refused or warned about here, with the
reason (docs/decisions.md, "Export"). Both configs record the source checkpoint, the position source and RoPE.
"""

import argparse
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train.config import DrafterConfig
from train.checkpoint import resolve_checkpoint

FORMATS = ("speculators", "dflash")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
MODELING_FILE = "modeling_dflash.py"
# Targets whose positions are 3-axis M-RoPE ids: axis 0 differs from the token index once an image is in context.
MROPE_TARGETS = ("qwen3_vl", "qwen3_vl_moe", "qwen3_5", "qwen3_5_moe")


def drafter_weight_names(num_layers: int) -> set[str]:
    """The exact tensor names of the drafter's own weights, which every loader maps by name."""
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    return names | {f"layers.{i}.{n}" for i in range(num_layers) for n in per_layer}


def check_exportable(d: DrafterConfig, manifest: dict, fmt: str, reduced: bool) -> None:
    """Refuse what the engine would run differently from training; warn where only some engine versions match."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}")
    target = manifest["target"]
    if d.mask_token_id is None or not 0 <= d.mask_token_id < target["vocab_size"]:
        raise ValueError(f"mask_token_id={d.mask_token_id} must be a target vocabulary id < {target['vocab_size']}: "
                         "the engines embed the mask slots with the target's embedding")
    n = target["num_hidden_layers"]
    bad = [i for i in d.target_layer_ids if not 0 <= i < n - 1]
    if bad:
        raise ValueError(
            f"target_layer_ids {list(d.target_layer_ids)} include {bad}: the target has {n} layers and serving engines "
            f"capture the residual stream after layers 0..{n - 2} only. Layer {n - 1} is the last one, whose Hugging "
            "Face hidden state (what training read) has the final norm applied, which vLLM and SGLang never capture; "
            "retrain with ids below the last layer")
    if d.partial_rotary_factor != 1:
        raise ValueError(
            f"partial_rotary_factor={d.partial_rotary_factor}: serving engines disagree on partial rotary (SGLang "
            "before 0.5.23 rotates the whole head whatever the config says), so this drafter would run with other "
            "positions than it was trained with; retrain with drafter.partial_rotary_factor=1")
    if fmt == "dflash" and reduced:
        raise ValueError(
            "a drafter trained with a reduced draft vocabulary cannot be exported in the dflash format: that layout "
            "has no head of its own, its loaders project with the target's full LM head; export --format "
            "speculators (lm_head + d2t) or retrain without objective.draft_vocab_size")
    if d.position_source == "mrope_axis0" and target["model_type"] in MROPE_TARGETS:
        if fmt == "dflash":
            raise ValueError(
                "drafter.position_source=mrope_axis0: SGLang and the original DFlash code feed plain token indices, "
                "which differ from axis 0 of the M-RoPE ids once an image is in context; export --format "
                "speculators for vLLM's V1 runner or retrain with drafter.position_source=sequential")
        warnings.warn(
            "drafter.position_source=mrope_axis0: only vLLM's V1 model runner feeds axis 0 of the target's M-RoPE ids; "
            "its default V2 runner (and SGLang) feed token indices, so serve with the V1 runner "
            "(VLLM_USE_V2_MODEL_RUNNER=0) or retrain with drafter.position_source=sequential", stacklevel=2)


def qwen3_fields(d: DrafterConfig, dtype: str) -> dict:
    """A Qwen3 text config for the drafter's layers: plain 1-D RoPE stated explicitly, every layer full attention and
    nothing causal (vLLM reads `is_causal` and `layer_types`; transformers, vLLM and our setups default rope_theta
    differently, so it is always written, in both the old and the new key)."""
    n = d.num_layers
    return {
        "model_type": "qwen3", "vocab_size": d.vocab_size, "hidden_size": d.hidden_size,
        "intermediate_size": d.intermediate_size, "num_hidden_layers": n,
        "num_attention_heads": d.num_attention_heads, "num_key_value_heads": d.num_key_value_heads,
        "head_dim": d.head_dim, "hidden_act": "silu", "rms_norm_eps": d.rms_norm_eps,
        "max_position_embeddings": d.max_position_embeddings, "attention_bias": False, "attention_dropout": 0.0,
        "rope_theta": d.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": d.rope_theta},
        "rope_scaling": None, "layer_types": ["full_attention"] * n, "use_sliding_window": False,
        "sliding_window": None, "max_window_layers": n, "is_causal": False, "tie_word_embeddings": False,
        "dtype": dtype, "torch_dtype": dtype,
    }


def provenance(ckpt_path: Path, d: DrafterConfig, manifest: dict) -> dict:
    return {"source_checkpoint": str(Path(ckpt_path).resolve()), "position_source": d.position_source,
            "rope": {"rope_type": "default", "rope_theta": d.rope_theta,
                     "partial_rotary_factor": d.partial_rotary_factor},
            "target": manifest["target"]["name_or_path"], "target_layer_ids": list(d.target_layer_ids)}


def verifier_architectures(model_type: str) -> list[str]:
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    arch = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    arch = arch or MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if arch is None:
        raise ValueError(f"target model_type {model_type!r} has no transformers architecture to name as verifier")
    return [arch]


def speculators_config(d: DrafterConfig, manifest: dict, draft_vocab_size: int, dtype: str, meta: dict) -> dict:
    target = manifest["target"]
    return {
        "architectures": ["DFlashSpeculator"],
        "speculators_model_type": "dflash",
        "speculators_config": {
            "algorithm": "dflash",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": d.block_size - 1,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target["name_or_path"],
                         "architectures": verifier_architectures(target["model_type"])},
        },
        "transformer_layer_config": qwen3_fields(d, dtype),
        "aux_hidden_state_layer_ids": [i + 1 for i in d.target_layer_ids],  # vLLM counts the embedding output as 0
        "mask_token_id": d.mask_token_id,
        "block_size": d.block_size,
        # Always written: speculators defaults it to 32000, and vLLM builds a reduced head whenever it differs from
        # the target's vocabulary.
        "draft_vocab_size": draft_vocab_size,
        "target_hidden_size": d.hidden_size,
        # vLLM turns this into dflash_config.causal = not sliding_window_non_causal, for every layer.
        "sliding_window_non_causal": True,
        # Slot 0 holds the verified token and predicts nothing (DFlash); DSpark-style drafters sample from it.
        "sample_from_anchor": False,
        "dtype": dtype, "torch_dtype": dtype,
        "dflash_offline": meta,
    }


def dflash_config(d: DrafterConfig, manifest: dict, dtype: str, meta: dict) -> dict:
    return {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": f"{Path(MODELING_FILE).stem}.DFlashDraftModel"},
        **qwen3_fields(d, dtype),
        "block_size": d.block_size,
        "num_target_layers": manifest["target"]["num_hidden_layers"],
        "dflash_config": {"mask_token_id": d.mask_token_id, "target_layer_ids": list(d.target_layer_ids)},
        "dflash_offline": meta,
    }


def vocab_tensors(draft_ids: torch.Tensor, head_VH: torch.Tensor, vocab_size: int) -> dict[str, torch.Tensor]:
    """lm_head rows in ascending target id; d2t[i] = target id - draft id (int64); t2d a bool mask over the target
    vocabulary."""
    ids = draft_ids.to(torch.long)
    if not bool((ids[1:] > ids[:-1]).all()) or ids[0] < 0 or ids[-1] >= vocab_size:
        raise ValueError(f"draft_ids must be strictly ascending target ids < {vocab_size}")
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[ids] = True
    return {"lm_head.weight": head_VH[ids], "d2t": ids - torch.arange(ids.numel()), "t2d": t2d}


def draft_head(ckpt, cache: str | None) -> torch.Tensor:
    """The target's full LM head from the cache the drafter was trained on (its reduced head is a row subset)."""
    from cache_schema import CacheReader

    url = cache or ckpt.config.get("data", {}).get("cache")
    if not url:
        raise ValueError(f"{ckpt.path}: reduced draft vocabulary needs the target's LM head rows; no cache is recorded "
                         "in the checkpoint config, pass --cache URL")
    try:
        reader = CacheReader(url)
        head = reader.head_tensors()["lm_head"]
    except Exception as e:
        raise ValueError(f"{ckpt.path}: reduced draft vocabulary needs the target's LM head rows from cache {url!r}, "
                         f"which could not be read ({e}); pass --cache URL") from e
    want, got = ckpt.manifest["target"].get("fingerprint"), reader.manifest.target.fingerprint
    if want != got:
        raise ValueError(f"cache {url!r} holds target fingerprint {got!r}, the drafter was trained on {want!r}")
    return head


def export(ckpt_path: Path, fmt: str, out: Path, cache: str | None = None, dtype: str = "bfloat16") -> Path:
    """Write the drafter at `ckpt_path` (a checkpoint or a run directory) to `out` in format `fmt`."""
    from train.checkpoint import load_drafter

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    ckpt_path = resolve_checkpoint(ckpt_path)
    ckpt = load_drafter(ckpt_path)
    d = ckpt.drafter
    reduced = ckpt.draft_ids is not None
    check_exportable(d, ckpt.manifest, fmt, reduced)
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in ckpt.model.state_dict().items()}
    expected = drafter_weight_names(d.num_layers)
    assert set(tensors) == expected, f"drafter weights differ from the export layout: {set(tensors) ^ expected}"
    meta = provenance(ckpt_path, d, ckpt.manifest)
    if fmt == "speculators":
        if reduced:
            extra = vocab_tensors(ckpt.draft_ids, draft_head(ckpt, cache), d.vocab_size)
            tensors.update({**extra, "lm_head.weight": extra["lm_head.weight"].to(DTYPES[dtype]).contiguous()})
        vocab = ckpt.draft_ids.numel() if reduced else d.vocab_size
        config = speculators_config(d, ckpt.manifest, vocab, dtype, meta)
    else:
        config = dflash_config(d, ckpt.manifest, dtype, meta)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    if fmt == "dflash":
        shutil.copyfile(Path(__file__).with_name("hf_dflash.py"), out / MODELING_FILE)
    return out


@dataclass
class ExportedDrafter:
    """An export read back into our Drafter (the reverse of `export`)."""

    format: str
    model: "Drafter"  # noqa: F821
    drafter: DrafterConfig
    config: dict
    draft_ids: torch.Tensor | None  # ascending target ids of a reduced vocabulary (from d2t)
    draft_head_VH: torch.Tensor | None  # the exported lm_head rows, one per draft id


def load_export(path: Path, embed_VH: torch.Tensor | None = None,
                lm_head_VH: torch.Tensor | None = None) -> ExportedDrafter:
    """An export directory (either format) -> our Drafter with its weights; embedding and head as in load_drafter."""
    from train.model import Drafter

    path = Path(path)
    config = json.loads((path / "config.json").read_text())
    if config.get("speculators_model_type") == "dflash":
        fmt, layer = "speculators", config["transformer_layer_config"]
        layer_ids, mask_id = [i - 1 for i in config["aux_hidden_state_layer_ids"]], config["mask_token_id"]
    elif "dflash_config" in config:
        fmt, layer = "dflash", config
        layer_ids, mask_id = config["dflash_config"]["target_layer_ids"], config["dflash_config"]["mask_token_id"]
    else:
        raise ValueError(f"{path}/config.json is neither a speculators DFlash config nor a DFlash config")
    meta = config.get("dflash_offline", {})
    drafter = DrafterConfig(
        hidden_size=layer["hidden_size"], vocab_size=layer["vocab_size"], target_layer_ids=layer_ids,
        num_layers=layer["num_hidden_layers"], num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer["num_key_value_heads"], head_dim=layer["head_dim"],
        intermediate_size=layer["intermediate_size"], rms_norm_eps=layer["rms_norm_eps"],
        rope_theta=layer["rope_parameters"]["rope_theta"], max_position_embeddings=layer["max_position_embeddings"],
        block_size=config["block_size"], mask_token_id=mask_id,
        position_source=meta.get("position_source", "sequential"))
    tensors = load_file(str(path / "model.safetensors"))
    d2t, head = tensors.pop("d2t", None), tensors.pop("lm_head.weight", None)
    tensors.pop("t2d", None)
    model = Drafter(drafter, embed_VH, lm_head_VH)
    model.load_state_dict(tensors)
    draft_ids = None if d2t is None else torch.arange(d2t.numel()) + d2t
    return ExportedDrafter(format=fmt, model=model.eval(), drafter=drafter, config=config, draft_ids=draft_ids,
                           draft_head_VH=head)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint directory (RUN/checkpoints/step-NNNNNNNN) or a run directory (its latest)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", help="cache holding the target's LM head (reduced vocabulary only); default: the "
                                        "cache recorded in the checkpoint's config")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    args = parser.parse_args(argv)
    out = export(args.checkpoint, args.format, args.out, args.cache, args.dtype)
    print(f"exported {resolve_checkpoint(args.checkpoint)} as {args.format} to {out}")


if __name__ == "__main__":
    main()
