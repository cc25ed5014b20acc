"""Inspect a dflash-offline cache.

    python -m tools.inspect_cache PATH_OR_URL [--verify] [--audit [--audit-samples N] [--audit-plot FILE.png]]
                                  [--recompute N --target PATH] [--sample K] [--plot FILE.png] [--json]

--verify checks the bytes (every chunk's checksum, every value a sample can hold); --audit what the hidden states
hold (cache_schema/audit.py: per layer RMS, zeros, non-finite values, spread, and the dead, non-finite and outlier
layers flagged; exit code 3 when any is); --recompute N reruns N cached samples through the target in transformers
and reports per layer how far the cache is from a fresh forward (tools/recompute.py).
"""

import argparse
import json
import os
import sys

import numpy as np

from cache_schema import CacheError, CacheReader, verify
from cache_schema.audit import audit
from cache_schema.layout import SHARDS_DIR, TOKENIZER_DIR
from cache_schema.storage import Location


def summary(reader: CacheReader) -> dict:
    m = reader.manifest
    stats = reader.stats
    # Bytes one token takes before compression: every token-axis array's row.
    row_bytes = sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in m.token_arrays().values())
    on_disk, shard_bytes = reader.loc.du(), reader.loc.du(SHARDS_DIR)
    tokens = max(stats["tokens"], 1)
    raw = stats["tokens"] * row_bytes
    out = {
        "url": reader.loc.url, "schema_version": m.schema_version,
        "target": m.target.name_or_path, "model_type": m.target.model_type,
        "hidden_size": m.target.hidden_size, "vocab_size": m.target.vocab_size,
        "target_layer_ids": m.target_layer_ids, "layer_convention": m.layer_convention,
        "storage": vars(m.storage), **stats,
        "supervised_fraction": stats["supervised_tokens"] / tokens,
        "bytes_on_disk": on_disk, "bytes_per_token": shard_bytes / tokens,
        "compression_ratio": raw / max(shard_bytes, 1),
    }
    run = reader.summary()
    if run is not None:
        out["skipped"] = run.get("skipped", {})
        out["missing_shards"] = sorted(reader.missing_shards())
    return out


def load_tokenizer(reader: CacheReader):
    from transformers import AutoTokenizer

    # Local directories only: inspection must never reach out to a hub.
    candidates = [reader.manifest.target.name_or_path]
    if not reader.loc.is_url and reader.check_tokenizer():
        candidates.insert(0, reader.loc.path(TOKENIZER_DIR))
    for source in candidates:
        if os.path.isdir(source):
            return AutoTokenizer.from_pretrained(source)
    return None


def render_sample(reader: CacheReader, index: int, tokenizer=None) -> str:
    """The conversation with supervised spans in [[...]] and runs of image tokens collapsed to <image xN>."""
    sample = reader[index]
    image_ids = {v for k, v in reader.manifest.special_tokens.items() if k in ("image_token_id", "video_token_id")}
    decode = (lambda ids: tokenizer.decode(ids)) if tokenizer else (lambda ids: " ".join(map(str, ids)) + " ")
    parts, i, ids, mask = [], 0, sample.input_ids.tolist(), sample.loss_mask
    while i < len(ids):
        j = i
        if ids[i] in image_ids:
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            parts.append(f"<image x{j - i}>")
        else:
            while j < len(ids) and ids[j] not in image_ids and mask[j] == mask[i]:
                j += 1
            text = decode(ids[i:j])
            parts.append(f"[[{text}]]" if mask[i] else text)
        i = j
    header = (f"sample {index} key={sample.key} tokens={len(sample)} supervised={int(mask.sum())} "
              f"meta={json.dumps(sample.meta)}")
    return header + "\n" + "".join(parts)


def plot(reader: CacheReader, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = reader.lengths()
    fractions = []
    for shard in reader.shards:
        mask = reader.read(shard, "loss_mask")
        off = reader.offsets(shard)
        fractions += [mask[a:b].mean() if b > a else 0.0 for a, b in zip(off[:-1], off[1:])]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.hist(lengths, bins=40, color="tab:blue")
    a.set(title=f"sample length ({len(lengths)} samples)", xlabel="tokens", ylabel="samples")
    b.hist(fractions, bins=40, range=(0, 1), color="tab:green")
    b.set(title="supervised fraction per sample", xlabel="loss-mask tokens / tokens")
    fig.tight_layout()
    with Location(path).fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("cache")
    parser.add_argument("--verify", action="store_true", help="read and check every chunk")
    parser.add_argument("--sample", type=int, action="append", default=[], help="print sample K decoded")
    parser.add_argument("--plot", help="write length and supervised-fraction histograms to this PNG")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--audit", action="store_true",
                        help="per captured layer over a sample: RMS, exact zeros, non-finite values, spread across "
                             "samples; flags dead, non-finite and outlier layers (exit code 3)")
    parser.add_argument("--audit-samples", type=int, default=64, help="samples the audit reads (default 64)")
    parser.add_argument("--audit-plot", help="write the audit's per-layer statistics to this PNG")
    parser.add_argument("--recompute", type=int, metavar="N",
                        help="rerun N cached samples through the target (transformers) and report each layer's "
                             "relative error against the cache")
    parser.add_argument("--target", help="with --recompute: the target model directory (default: the cache's)")
    args = parser.parse_args(argv)
    try:
        return inspect(args)
    except CacheError as e:  # not a cache, a damaged one, or one this release cannot read: one line says which
        return fail(e, 1)
    except (ValueError, OSError) as e:  # a mistaken option, or an output that cannot be written (full disk, ...)
        return fail(e, 2)


def fail(error: Exception, code: int) -> int:
    message = " ".join(str(error).split())  # one line, whatever the error's own text holds
    print(f"inspect_cache: {message}", file=sys.stderr)
    return code


def inspect(args) -> int:
    reader = CacheReader(args.cache)
    bad = [k for k in args.sample if not 0 <= k < len(reader)]
    if bad:  # before any output, so that a mistake prints nothing but its one line
        raise ValueError(f"--sample {bad[0]}: the cache holds {len(reader)} samples, numbered from 0")
    if args.audit_samples < 1 or (args.recompute is not None and args.recompute < 1):
        raise ValueError("--audit-samples and --recompute take a count >= 1")
    info = summary(reader)
    if args.verify:
        info["verify"] = verify(args.cache, progress=not args.json)
    if args.audit or args.audit_plot:
        info["audit"] = audit(reader, args.audit_samples)
    if args.recompute:
        from tools.recompute import recompute

        info["recompute"] = recompute(reader, args.recompute, args.target)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            if key in ("audit", "recompute"):
                continue
            if isinstance(value, float):
                value = f"{value:.4g}"
            print(f"{key:<{width}}  {value}")
        if "audit" in info:
            print("\n" + audit_table(info["audit"]))
        if "recompute" in info:
            from tools.recompute import recompute_table

            print("\n" + recompute_table(info["recompute"]))
    if args.audit_plot:
        audit_plot(info["audit"], args.audit_plot)
        print(f"audit plot written to {args.audit_plot}", file=sys.stderr)
    if args.sample:
        tokenizer = load_tokenizer(reader)
        for k in args.sample:
            print("\n" + render_sample(reader, k, tokenizer))
    if args.plot:
        plot(reader, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    flagged = "audit" in info and info["audit"]["flagged"]
    off = "recompute" in info and info["recompute"]["beyond_tolerance"]
    return 3 if flagged or off else 0


def audit_table(report: dict) -> str:
    rows = [f"audit of {report['samples']} samples ({report['tokens']} tokens): {report['verdict']}",
            "| layer | RMS | exact zeros | non-finite | RMS spread across samples | flags |", "|---|---|---|---|---|---|"]
    rows += [f"| {x['layer']} | {x['rms']:.4g} | {x['zero_share']:.2%} | {x['non_finite']} | "
             f"{x['sample_rms_spread']:.3f} | {', '.join(x['flags']) or '-'} |" for x in report["layers"]]
    return "\n".join(rows)


def audit_plot(report: dict, path: str) -> None:
    """Per layer: RMS (log scale), share of exact zeros, non-finite values, spread; flagged layers in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [str(x["layer"]) for x in report["layers"]]
    colours = ["tab:red" if x["flags"] else "tab:blue" for x in report["layers"]]
    panels = (("rms", "RMS", True), ("zero_share", "share of exact zeros", False),
              ("non_finite", "non-finite values", False), ("sample_rms_spread", "RMS spread across samples", False))
    fig, axes = plt.subplots(1, 4, figsize=(14, 3.4))
    for ax, (key, title, log) in zip(axes, panels):
        ax.bar(names, [max(x[key], 1e-30) if log else x[key] for x in report["layers"]], color=colours)
        ax.set(title=title, xlabel="target layer")
        if log:
            ax.set_yscale("log")
        else:  # counts and shares start at 0, and an all-zero panel still shows its scale
            ax.set_ylim(0, max(1.0 if key != "sample_rms_spread" else 0.0, *(x[key] * 1.1 for x in report["layers"])))
    fig.suptitle(f"cache audit ({report['samples']} samples): {report['verdict']}", fontsize=10)
    fig.tight_layout()
    with Location(path).fs.open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
