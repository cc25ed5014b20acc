"""The layouts a drafter is exported to, one record each: what its config.json holds, which files go beside the
weights, what it can carry, and how to read it back. A new serving format is one more record in FORMATS.

speculators  vLLM's format (`vllm serve DIR` detects it): config.json with `speculators_model_type: dflash`, a
             Qwen3 `transformer_layer_config`, `aux_hidden_state_layer_ids` = target_layer_ids + 1;
             model.safetensors with the drafter's weights, plus `lm_head`, `d2t`, `t2d` for a reduced vocabulary.
             DFlash2: `speculators_model_type: dflash2` and its four settings at the top level, as vLLM's
             `update_dflash2` reads them.
dflash       the original DFlash layout (SGLang, the z-lab code): a Qwen3 config.json with `dflash_config`
             {mask_token_id, target_layer_ids}, `block_size`, `num_target_layers`, `auto_map` to the
             modeling_dflash.py written beside it (train/hf_dflash.py); the drafter's weights only. DFlash2:
             `architectures: [DFlash2DraftModel]` and its settings in `dflash_config`, as SGLang's
             `parse_dflash_draft_config` reads them (vLLM too, with method dflash); no modeling file.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cache_schema import Manifest
from train.config import DrafterConfig

MODELING_FILE = "modeling_dflash.py"


@dataclass(frozen=True)
class ExportFormat:
    name: str
    # (drafter, cache manifest, draft vocabulary size, dtype, provenance) -> config.json
    config: Callable[[DrafterConfig, Manifest, int, str, dict], dict]
    carries_head: bool  # holds its own (reduced) lm_head; otherwise loaders project with the target's full head
    # Its engines feed token indices only, so an axis-0 (M-RoPE) drafter is refused rather than warned about.
    token_index_positions_only: bool
    extra_files: dict[str, Path]  # written beside the weights: name -> source file
    is_it: Callable[[dict], bool]  # whether a config.json is of this format
    # config.json -> (Qwen3 layer fields, target_layer_ids, mask id, DFlash2's settings or {})
    read: Callable[[dict], tuple[dict, list[int], int, dict]]


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


DFLASH2_KEYS = ("conv_kernel_size", "conv_group_size", "selector_rank", "selector_top_k")
UNARY_KEYS = ("output_multiplier", "final_logit_softcapping")  # what the dflash layout carries beside them


def dflash2_settings(d: DrafterConfig, keys: tuple[str, ...]) -> dict:
    return {k: getattr(d, k) for k in keys} if d.architecture == "dflash2" else {}


def verifier_architectures(model_type: str) -> list[str]:
    """The class the target loads as: what its family's Auto class maps its config class to, so that a family
    transformers learned at run time (`AutoConfig.register`) is named too."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from extract.families import family

    auto_class = getattr(transformers, family(model_type).auto_class)
    try:
        return [auto_class._model_mapping[CONFIG_MAPPING[model_type]].__name__]
    except KeyError:
        raise ValueError(f"target model_type {model_type!r} has no {auto_class.__name__} class in this transformers "
                         "to name as verifier") from None


def speculators_config(d: DrafterConfig, manifest: Manifest, draft_vocab_size: int, dtype: str, meta: dict) -> dict:
    target = manifest.target
    v2 = d.architecture == "dflash2"
    return {
        "architectures": ["DFlash2DraftModel" if v2 else "DFlashSpeculator"],
        "speculators_model_type": d.architecture,
        **dflash2_settings(d, DFLASH2_KEYS),
        "speculators_config": {
            "algorithm": d.architecture,
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": d.block_size - 1,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": target.name_or_path,
                         "architectures": verifier_architectures(target.model_type)},
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


def dflash_config(d: DrafterConfig, manifest: Manifest, draft_vocab_size: int, dtype: str, meta: dict) -> dict:
    v2 = d.architecture == "dflash2"
    settings = dflash2_settings(d, DFLASH2_KEYS + UNARY_KEYS)
    if settings.get("final_logit_softcapping") is None:
        settings.pop("final_logit_softcapping", None)
    return {
        "architectures": ["DFlash2DraftModel" if v2 else "DFlashDraftModel"],
        # modeling_dflash.py holds DFlash's architecture only: a DFlash2 export names no code to run.
        **({} if v2 else {"auto_map": {"AutoModel": f"{Path(MODELING_FILE).stem}.DFlashDraftModel"}}),
        **qwen3_fields(d, dtype),
        "block_size": d.block_size,
        "num_target_layers": manifest.target.num_hidden_layers,
        "dflash_config": {"mask_token_id": d.mask_token_id, "target_layer_ids": list(d.target_layer_ids),
                          **({"block_size": d.block_size} if v2 else {}), **settings},
        "dflash_offline": meta,
    }


def _speculators_fields(config: dict) -> tuple[dict, list[int], int, dict]:
    v2 = {"architecture": "dflash2", **{k: config[k] for k in DFLASH2_KEYS}} \
        if config["speculators_model_type"] == "dflash2" else {}
    return (config["transformer_layer_config"], [i - 1 for i in config["aux_hidden_state_layer_ids"]],
            config["mask_token_id"], v2)


def _dflash_fields(config: dict) -> tuple[dict, list[int], int, dict]:
    dc = config["dflash_config"]
    v2 = {"architecture": "dflash2", **{k: dc[k] for k in DFLASH2_KEYS + UNARY_KEYS if k in dc}} \
        if "DFlash2DraftModel" in config.get("architectures", []) else {}
    return config, dc["target_layer_ids"], dc["mask_token_id"], v2


FORMATS = {f.name: f for f in (
    ExportFormat("speculators", speculators_config, carries_head=True, token_index_positions_only=False,
                 extra_files={}, is_it=lambda c: c.get("speculators_model_type") in ("dflash", "dflash2"),
                 read=_speculators_fields),
    ExportFormat("dflash", dflash_config, carries_head=False, token_index_positions_only=True,
                 extra_files={MODELING_FILE: Path(__file__).with_name("hf_dflash.py")},
                 is_it=lambda c: "dflash_config" in c, read=_dflash_fields),
)}
