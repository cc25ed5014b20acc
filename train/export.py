"""Export a trained drafter to the layouts serving engines load unmodified (train/export_formats.py).

    python -m train.export CKPT --format speculators|dflash --out DIR [--cache URL] [--dtype bfloat16] [--overwrite]

Every setting an engine would silently read differently from training is refused or warned about here, with the
reason (docs/decisions.md, "Export"). Both configs record the source checkpoint, the position source and RoPE.
The export is written beside --out and renamed into place: a refusal or a crash leaves --out as it was, and
--out is never a checkpoint, a run directory or anything but an earlier export (replaced only with --overwrite).
"""

import argparse
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from cache_schema import CacheError, Manifest
from cache_schema.codecs import DTYPES
from cache_schema.disk import writing
from extract.families import FAMILIES  # train's one import from extract: the family records, which import nothing
from train.checkpoint import declared_mismatch, read_checkpoint, safetensors_header
from train.config import DrafterConfig
from train.export_formats import FORMATS

def drafter_weight_names(d: DrafterConfig) -> set[str]:
    """The exact tensor names of the drafter's own weights, which every loader maps by name."""
    per_layer = [f"self_attn.{p}_proj.weight" for p in "qkvo"] + ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]
    per_layer += [f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")]
    per_layer += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    names = {"fc.weight", "hidden_norm.weight", "norm.weight"}
    if d.architecture == "dflash2":
        per_layer += [f"{c}.{p}" for c in ("attention_conv", "mlp_conv") for p in ("base_kernel",
                                                                                  "kernel_projection.weight")]
        names |= {f"candidate_selector.{p}" for p in ("predecessor_codebook", "successor_codebook",
                                                       "hidden_projection.weight")}
    return names | {f"layers.{i}.{n}" for i in range(d.num_layers) for n in per_layer}


def check_exportable(d: DrafterConfig, manifest: Manifest, fmt: str, reduced: bool) -> None:
    """Refuse what the engine would run differently from training; warn where only some engine versions match."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}")
    layout, target = FORMATS[fmt], manifest.target
    if d.mask_token_id is None or not 0 <= d.mask_token_id < target.vocab_size:
        raise ValueError(f"mask_token_id={d.mask_token_id} must be a target vocabulary id < {target.vocab_size}: "
                         "the engines embed the mask slots with the target's embedding")
    n = target.num_hidden_layers
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
    if d.architecture == "dflash2":
        check_dflash2_exportable(d, fmt, reduced)
    if reduced and not layout.carries_head:
        raise ValueError(
            f"a drafter trained with a reduced draft vocabulary cannot be exported in the {fmt} format: that layout "
            "has no head of its own, its loaders project with the target's full LM head; export --format "
            "speculators (lm_head + d2t) or retrain without objective.draft_vocab_size")
    # An M-RoPE target's axis 0 differs from the token index once an image is in context. The record is read here,
    # not at import, so that a family registered later (a test's, a user's) counts too.
    if d.position_source == "mrope_axis0" and getattr(FAMILIES.get(target.model_type), "mrope", False):
        if layout.token_index_positions_only:
            raise ValueError(
                f"drafter.position_source=mrope_axis0: the engines of the {fmt} format (SGLang, the original DFlash "
                "code) feed plain token indices, which differ from axis 0 of the M-RoPE ids once an image is in "
                "context; export --format speculators for vLLM's V1 runner or retrain with "
                "drafter.position_source=sequential")
        warnings.warn(
            "drafter.position_source=mrope_axis0: only vLLM's V1 model runner feeds axis 0 of the target's M-RoPE ids; "
            "its default V2 runner (and SGLang) feed token indices, so serve with the V1 runner "
            "(VLLM_USE_V2_MODEL_RUNNER=0), which also gives an image's context one cache slot "
            "(docs/vllm_cpu_defects.md), or retrain with drafter.position_source=sequential", stacklevel=2)


def check_dflash2_exportable(d: DrafterConfig, fmt: str, reduced: bool) -> None:
    """What the engines' DFlash2 loaders cannot carry (vLLM 0.32's qwen3_dflash2.py and update_dflash2, SGLang
    0.5.23's DFlash2DraftModel)."""
    if reduced:
        raise ValueError(
            "a DFlash2 drafter trained with a reduced draft vocabulary cannot be served: vLLM and SGLang take its "
            "candidates from the target's full vocabulary and apply no d2t to them (vLLM would draft wrong ids, "
            "SGLang uses the target's head); retrain without objective.draft_vocab_size")
    if fmt == "speculators" and (d.output_multiplier != 1 or d.final_logit_softcapping is not None):
        raise ValueError(
            f"drafter.output_multiplier={d.output_multiplier}, drafter.final_logit_softcapping="
            f"{d.final_logit_softcapping}: vLLM's speculators reader passes only the four DFlash2 settings on, so it "
            "would serve the unary logits unscaled; export --format dflash, which vLLM reads with "
            "--speculative-config '{\"method\": \"dflash\", ...}' and SGLang as it is")


def provenance(ckpt_path: Path, d: DrafterConfig, manifest: Manifest) -> dict:
    return {"source_checkpoint": str(Path(ckpt_path).resolve()), "position_source": d.position_source,
            "rope": {"rope_type": "default", "rope_theta": d.rope_theta,
                     "partial_rotary_factor": d.partial_rotary_factor},
            "target": manifest.target.name_or_path, "target_layer_ids": list(d.target_layer_ids)}


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

    url = cache or next((c.url for c in ckpt.caches), None)  # a mixture's caches share one head
    if not url:
        raise ValueError(f"{ckpt.path}: reduced draft vocabulary needs the target's LM head rows; no cache is recorded "
                         "in the checkpoint config, pass --cache URL")
    try:
        reader = CacheReader(url)
        head = reader.head_tensors()["lm_head"]
    except Exception as e:
        raise ValueError(f"{ckpt.path}: reduced draft vocabulary needs the target's LM head rows from cache {url!r}, "
                         f"which could not be read ({e}); pass --cache URL") from e
    want, got = ckpt.manifest.target.fingerprint, reader.manifest.target.fingerprint
    if want != got:
        raise ValueError(f"cache {url!r} holds target fingerprint {got!r}, the drafter was trained on {want!r}")
    return head


def check_out(out: Path, fmt: str, overwrite: bool) -> None:
    """Refuse an --out that is not ours to replace, before any work."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    resolved = out.resolve()
    for parent in (resolved, *resolved.parents):
        if (parent / "state.json").exists() or (parent / "checkpoints").is_dir():
            raise ValueError(f"--out {out} is inside the checkpoint or run directory {parent}; export elsewhere")
    if out.is_dir() and any(out.iterdir()):
        if not is_our_export(out, fmt):
            raise ValueError(f"--out {out} is a non-empty directory that is not a {fmt} export written by "
                             "train.export; choose another")
        if not overwrite:
            raise ValueError(f"--out {out} already holds a {fmt} export; pass --overwrite to replace it")
    existing = next((p for p in (resolved, *resolved.parents) if p.exists()), None)
    if existing is None or not os.access(existing, os.W_OK):
        raise ValueError(f"--out {out}: {existing} is not writable")


def is_our_export(path: Path, fmt: str) -> bool:
    """A directory holding exactly what `export` writes in `fmt`, with our provenance in its config: the only
    kind of directory --overwrite may replace."""
    layout, config = FORMATS[fmt], _read_json(path / "config.json")
    files = {"config.json", "model.safetensors", *layout.extra_files}
    return layout.is_it(config) and "dflash_offline" in config and {p.name for p in path.iterdir()} <= files


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def export(ckpt_path: Path, fmt: str, out: Path, cache: str | None = None, dtype: str = "bfloat16",
           overwrite: bool = False) -> Path:
    """Write the drafter at `ckpt_path` (a checkpoint or a run directory) to `out` in format `fmt`."""
    from train.checkpoint import load_drafter

    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    check_out(out, fmt, overwrite)
    ckpt = load_drafter(ckpt_path)
    d = ckpt.drafter
    reduced = ckpt.draft_ids is not None
    check_exportable(d, ckpt.manifest, fmt, reduced)
    layout = FORMATS[fmt]
    tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in ckpt.model.state_dict().items()}
    expected = drafter_weight_names(d)
    assert set(tensors) == expected, f"drafter weights differ from the export layout: {set(tensors) ^ expected}"
    if reduced:
        extra = vocab_tensors(ckpt.draft_ids, draft_head(ckpt, cache), d.vocab_size)
        tensors.update({**extra, "lm_head.weight": extra["lm_head.weight"].to(DTYPES[dtype]).contiguous()})
    vocab = ckpt.draft_ids.numel() if reduced else d.vocab_size
    config = layout.config(d, ckpt.manifest, vocab, dtype, provenance(ckpt.path, d, ckpt.manifest))
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=parent))
    old = parent / f"{tmp.name}.old"
    try:
        with writing("export", out):
            _write_export(tmp, tensors, config, layout if d.architecture == "dflash" else None)
        if out.exists():  # an earlier export of this format, and --overwrite (check_out): set aside until replaced
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out


def _write_export(tmp: Path, tensors: dict, config: dict, layout) -> None:
    """The export's files into `tmp`; `layout` names the files written beside the weights (None: none)."""
    save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name, source in layout.extra_files.items() if layout is not None else ():
        shutil.copyfile(source, tmp / name)


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
    fmt = next((name for name, layout in FORMATS.items() if layout.is_it(config)), None)
    if fmt is None:
        raise ValueError(f"{path}/config.json is none of the export formats {', '.join(FORMATS)}")
    layer, layer_ids, mask_id, v2 = FORMATS[fmt].read(config)
    meta = config.get("dflash_offline", {})
    drafter = DrafterConfig(
        hidden_size=layer["hidden_size"], vocab_size=layer["vocab_size"], target_layer_ids=layer_ids,
        num_layers=layer["num_hidden_layers"], num_attention_heads=layer["num_attention_heads"],
        num_key_value_heads=layer["num_key_value_heads"], head_dim=layer["head_dim"],
        intermediate_size=layer["intermediate_size"], rms_norm_eps=layer["rms_norm_eps"],
        rope_theta=layer["rope_parameters"]["rope_theta"], max_position_embeddings=layer["max_position_embeddings"],
        block_size=config["block_size"], mask_token_id=mask_id,
        position_source=meta.get("position_source", "sequential"), **v2)
    shapes = safetensors_header(path / "model.safetensors")
    why = declared_mismatch({k: v for k, v in shapes.items() if k not in ("d2t", "t2d", "lm_head.weight")}, drafter)
    if why:
        raise ValueError(f"export {path}: config.json and model.safetensors disagree: {why}")
    tensors = load_file(str(path / "model.safetensors"))
    d2t, head = tensors.pop("d2t", None), tensors.pop("lm_head.weight", None)
    tensors.pop("t2d", None)
    with torch.random.fork_rng(devices=[]):  # the initialisation is overwritten; the caller's RNG is left alone
        model = Drafter(drafter, embed_VH, lm_head_VH)
    model.load_state_dict(tensors)
    draft_ids = None if d2t is None else torch.arange(d2t.numel()) + d2t
    return ExportedDrafter(format=fmt, model=model.eval(), drafter=drafter, config=config, draft_ids=draft_ids,
                           draft_head_VH=head)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint directory (RUN/checkpoints/step-NNNNNNNN), a run directory (its latest) "
                             "or RUN/best (the best by replayed tau)")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--cache", help="cache holding the target's LM head (reduced vocabulary only); default: the "
                                        "cache recorded in the checkpoint's config")
    parser.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier export of this format at --out")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.format, args.out, args.cache, args.dtype, args.overwrite)
    except (ValueError, CacheError) as e:
        raise SystemExit(f"train.export: {e}") from None
    print(f"exported {read_checkpoint(args.checkpoint).path} as {args.format} to {out}")


if __name__ == "__main__":
    main()
