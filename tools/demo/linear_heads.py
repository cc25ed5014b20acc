"""The learned Qwen3.5 with wider linear-attention heads: the same function, in shapes vLLM's CPU build serves.

The committed learned Qwen3.5 has Gated DeltaNet heads of 16; vLLM's CPU kernels take heads of 64 or 128 only (and
bf16 only). Widening pads every head's key, query and value channels with zeros, which computes the same outputs:
the kernel L2-normalises queries and keys (zeros change no norm), a zero value channel stays zero through the state,
and the gated RMSNorm after the recurrence normalises each head, so only its weight changes (by sqrt(old/new) for
the values' padding; the query scale 1/sqrt(head) cancels in that norm). What remains is the norm's epsilon, which
acts as if (new/old)^2 times larger on the original channels (1.6e-5 for 16 -> 64): far below bf16 rounding.
Ours, not a retraining: the plateau the learned build escaped is not met again (docs/decisions.md).

    python -m tools.demo.linear_heads SRC_MODEL_DIR OUT_MODEL_DIR [--head-dim 64]
"""

import argparse
import hashlib
import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "model.safetensors"
HEAD_DIM = 64  # the real models use 128; 64 is the smallest the CPU kernels take


def pad_heads(x: torch.Tensor, heads: int, old: int, new: int, dim: int = 0) -> torch.Tensor:
    """`x` with each of its `heads` runs of `old` channels along `dim` followed by zeros up to `new`."""
    x = x.movedim(dim, 0)
    out = x.new_zeros((heads, new, *x.shape[1:]))
    out[:, :old] = x.reshape(heads, old, *x.shape[1:])
    return out.reshape(heads * new, *x.shape[1:]).movedim(0, dim)


def widen_tensors(tensors: dict, text: dict, head_dim: int) -> dict:
    """The checkpoint's tensors with every linear-attention layer's heads padded to `head_dim`."""
    nk, nv = text["linear_num_key_heads"], text["linear_num_value_heads"]
    dk, dv = text["linear_key_head_dim"], text["linear_value_head_dim"]

    def qkv(x: torch.Tensor) -> torch.Tensor:  # rows: queries, keys, values (in_proj_qkv and the conv)
        q, k, v = x.split([nk * dk, nk * dk, nv * dv])
        return torch.cat([pad_heads(q, nk, dk, head_dim), pad_heads(k, nk, dk, head_dim),
                          pad_heads(v, nv, dv, head_dim)])

    out = {}
    for name, x in tensors.items():
        if ".linear_attn." not in name:
            out[name] = x
        elif name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
            out[name] = qkv(x)
        elif name.endswith("in_proj_z.weight"):
            out[name] = pad_heads(x, nv, dv, head_dim)
        elif name.endswith("out_proj.weight"):
            out[name] = pad_heads(x, nv, dv, head_dim, dim=1)
        elif name.endswith("norm.weight"):  # one head's: the padded values' zeros lower each head's mean square
            out[name] = pad_heads(x * math.sqrt(dv / head_dim), 1, dv, head_dim)
        else:  # A_log, dt_bias, in_proj_a, in_proj_b: per value head
            out[name] = x
    return {k: v.contiguous() for k, v in out.items()}


def widen(src: Path, out: Path, head_dim: int = HEAD_DIM) -> Path:
    """Write `src` (a Qwen3.5 checkpoint directory) with linear-attention heads of `head_dim` to `out`."""
    src, out = Path(src), Path(out)
    if not (src / "config.json").is_file() or not (src / WEIGHTS).is_file():
        raise ValueError(f"{src}: not a one-file checkpoint directory (config.json and {WEIGHTS})")
    config = json.loads((src / "config.json").read_text())
    text = config["text_config"]
    if config.get("model_type") not in ("qwen3_5", "qwen3_5_moe"):
        raise ValueError(f"{src}: model_type {config.get('model_type')!r} has no linear-attention heads to widen")
    if head_dim < max(text["linear_key_head_dim"], text["linear_value_head_dim"]):
        raise ValueError(f"--head-dim {head_dim} is narrower than {src}'s linear-attention heads")
    out.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.name not in (WEIGHTS, "config.json"):
            shutil.copy2(f, out / f.name)
    save_file(widen_tensors(load_file(src / WEIGHTS), text, head_dim), out / WEIGHTS, metadata={"format": "pt"})
    # The gated norm's mean square shrinks by (new/old)^2 (the padded values' zeros, the query scale): its epsilon
    # with it. The config holds one epsilon for every norm; the others' mean squares are far above either.
    shrink = head_dim ** 2 / (text["linear_key_head_dim"] * text["linear_value_head_dim"])
    text.update(linear_key_head_dim=head_dim, linear_value_head_dim=head_dim,
                rms_norm_eps=text["rms_norm_eps"] / shrink)
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def servable(src: Path, work_dir: Path, head_dim: int = HEAD_DIM) -> Path:
    """`src` widened under `work_dir/servable-KEY` (KEY: the source's weights and the head size), made only once;
    written under a temporary name and renamed, so a killed run is never reused."""
    digest = hashlib.sha256((Path(src) / WEIGHTS).read_bytes() + str(head_dim).encode()).hexdigest()[:12]
    final = Path(work_dir) / f"servable-{digest}"
    if not (final / "config.json").exists():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        widen(src, partial, head_dim).rename(final)
    return final


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--head-dim", type=int, default=HEAD_DIM)
    args = p.parse_args()
    try:
        print(widen(args.src, args.out, args.head_dim))
    except (ValueError, FileExistsError) as e:
        raise SystemExit(f"tools.demo.linear_heads: {e}") from None


if __name__ == "__main__":
    main()
