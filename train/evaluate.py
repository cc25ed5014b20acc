"""Offline acceptance of a drafter checkpoint, replayed exactly from the cache (train/replay.py).

    python -m train.evaluate CKPT [--cache URL] [--shards a,b] [--vp CKPT] [--k 4] [--max-samples N] [--out DIR]

CKPT is a checkpoint directory, a run directory (its latest checkpoint) or RUN/best (the best by replayed tau).
Prints a table and writes eval.json and eval.png in --out (default: the checkpoint directory). The shards
default to the run's eval shards (the last data.eval_shards committed shards, as training held them out); a
drafter trained on several caches is replayed on each one's and reported per cache and pooled, unless --cache
names one.
"""

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from cache_schema import CacheError, CacheReader  # noqa: E402
from train.caches import target_mismatches  # noqa: E402
from train.checkpoint import load_drafter, read_checkpoint  # noqa: E402
from train.config import SERVED_POSITION_SOURCES, check_choice, served_position_source  # noqa: E402
from train.data import CacheDataset, split_shards  # noqa: E402
from train.replay import GROUPS, GreedyDrafter, replay_figures, replay_records, shown  # noqa: E402


def check_cache(path: Path, manifest, reader: CacheReader) -> None:
    bad = target_mismatches(reader.manifest, manifest)
    if bad:
        raise ValueError(f"drafter {path} was trained on another target than cache {reader.loc.url}: differing "
                         f"keys {bad}")


def load(path: Path, reader: CacheReader, head: dict, device, backend: str):
    ckpt = load_drafter(path, head["embed_tokens"], head["lm_head"])
    check_cache(path, ckpt.manifest, reader)
    ckpt.model.to(device)
    return ckpt, GreedyDrafter.from_checkpoint(ckpt, backend)


def pick_shards(reader: CacheReader, eval_shards: int, shards: str | None) -> list[str]:
    if shards:
        wanted = shards.split(",")
        unknown = [s for s in wanted if s not in reader.shards]
        if unknown:
            raise ValueError(f"--shards: {unknown} not committed in cache {reader.loc.url} "
                             f"(it has {reader.shards})")
        return wanted
    held_out = split_shards(reader, eval_shards)[1]
    if not held_out:
        raise ValueError(f"cache {reader.loc.url} held out no eval shard (data.eval_shards={eval_shards}, "
                         f"{len(reader.shards)} shards); name some with --shards")
    return held_out


def evaluate_checkpoint(ckpt_path: Path, cache: str | None = None, shards: str | None = None, vp_path: Path | None = None,
             k: int = 4, max_samples: int | None = None, out: Path | None = None, device: str | None = None,
             backend: str = "dense", progress: bool = True, position_source: str | None = None) -> dict:
    """Replay `ckpt_path` (and D2SD with `vp_path`) on held-out cache samples at `position_source` (default: the
    drafter's served_position_source)."""
    if position_source is not None:
        check_choice("--position-source", position_source, SERVED_POSITION_SOURCES)
    if k < 1:
        raise ValueError(f"--k={k} must be >= 1")
    if max_samples is not None and max_samples < 1:
        raise ValueError(f"--max-samples={max_samples} must be >= 1")
    info = read_checkpoint(ckpt_path)
    ckpt_path = info.path
    caches = [(None, cache)] if cache else [(c.name, c.url) for c in info.caches]
    if shards and len(caches) > 1:
        raise ValueError(f"--shards names shards of one cache; {ckpt_path} was trained on {len(caches)} caches: "
                         "name one with --cache")
    readers = [CacheReader(url) for _, url in caches]
    head = readers[0].head_tensors()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpt, dflash = load(ckpt_path, readers[0], head, device, backend)
    for reader in readers[1:]:
        check_cache(ckpt_path, ckpt.manifest, reader)
    vp = None
    if vp_path is not None:
        vp_path = read_checkpoint(vp_path).path
        vp_ckpt, vp = load(vp_path, readers[0], head, device, backend)
        if vp_ckpt.drafter.block_size != ckpt.drafter.block_size:
            raise ValueError(f"--vp {vp_path}: drafter.block_size={vp_ckpt.drafter.block_size} but the DFlash "
                             f"drafter's is {ckpt.drafter.block_size}; D2SD branches replace slots of one block")
        if served_position_source(vp_ckpt.drafter.position_source) != served_position_source(
                ckpt.drafter.position_source):
            raise ValueError(f"--vp {vp_path}: drafter.position_source={vp_ckpt.drafter.position_source!r} but the "
                             f"DFlash drafter uses {ckpt.drafter.position_source!r}; D2SD needs one position source")
    block = dflash.block
    source = position_source or served_position_source(ckpt.drafter.position_source)
    methods = ("dflash", "d2sd") if vp is not None else ("dflash",)
    parts = []  # (name, reader, shard names, records) per cache replayed
    for (name, _), reader in zip(caches, readers):
        if len(caches) > 1 and not split_shards(reader, ckpt.eval_shards)[1]:
            print(f"cache {reader.loc.url} held out no eval shard: not replayed")
            continue
        names = pick_shards(reader, ckpt.eval_shards, shards)
        dataset = CacheDataset(reader, names, source)
        if not len(dataset):
            raise ValueError(f"shards {names} of cache {reader.loc.url} hold no sample")
        indices = range(min(len(dataset), max_samples) if max_samples else len(dataset))
        parts.append((name, reader, names, replay_records(dataset, indices, dflash, vp, k, progress)))
    if not parts:
        raise ValueError(f"none of the caches of {ckpt_path} held out an eval shard; name one with --cache and "
                         "--shards")
    records = [r for *_, recs in parts for r in recs]
    result = {"checkpoint": str(ckpt_path), "vp": str(vp_path) if vp_path else None, "position_source": source}
    if len(caches) == 1:
        result.update(cache=parts[0][1].loc.url, shards=parts[0][2])
    else:
        result["caches"] = [{"name": name, "cache": reader.loc.url, "shards": names, "samples": len(recs),
                             **{m: replay_figures(recs, block, m) for m in methods}}
                            for name, reader, names, recs in parts]
    result.update({"samples": len(records), "block_size": block, "k": k if vp else None,
                   **{m: replay_figures(records, block, m) for m in methods}})
    result["per_sample"] = [{**({"cache": name} if len(caches) > 1 else {}), "sample_id": r["sample_id"],
                             "key": r["key"], "images": r["images"],
                             **{m: {"cycles": int(r[m].accepted.size), "committed": int(r[m].committed.sum()),
                                    "accepted": r[m].accepted.tolist()} for m in methods}}
                            for name, _, _, recs in parts for r in recs]
    out = Path(out) if out else ckpt_path
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "eval.png")
    print(table(result))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    return result


def table(result: dict) -> str:
    block = result["block_size"]
    where = (",".join(result["shards"]) if "shards" in result else
             "; ".join(f"{c['name']}: {','.join(c['shards'])}" for c in result["caches"]))
    lines = [f"{result['checkpoint']}: {result['samples']} samples of {where}, block "
             f"{block}" + (f", D2SD with {result['vp']} (k={result['k']})" if result["vp"] else "")]
    head = f"{'method':7} {'group':10} {'samples':>7} {'cycles':>7} {'tau':>6} {'tau/smp':>7}  P(slot k accepted)"
    lines.append(head)
    for method in ("dflash", "d2sd"):
        rows = [(group, result[method][group]) for group in GROUPS] if method in result else []
        rows += [(f"cache {c['name']}", c[method]["all"]) for c in result.get("caches", []) if method in c]
        for group, g in rows:
            slots = " ".join(shown(p, ".2f") for p in g["accept_per_slot"])
            lines.append(f"{method:7} {group:10} {g['samples']:7d} {g['cycles']:7d} {shown(g['tau']):>6} "
                         f"{shown(g['tau_per_sample']):>7}  {slots}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path:
    block = result["block_size"]
    methods = [m for m in ("dflash", "d2sd") if m in result]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(methods)
    for n, method in enumerate(methods):
        for group, style in (("all", "o-"), ("last_turn", "s--"), ("history", "^:")):
            g = result[method][group]
            if g["cycles"]:
                axes[0].plot(range(1, block), g["accept_per_slot"], style, color=f"C{n}",
                             label=f"{method} {group} (tau {g['tau']:.2f})")
        hist = result[method]["all"]["accepted_hist"]
        total = max(1, sum(hist))
        axes[1].bar([a + (n - (len(methods) - 1) / 2) * width for a in range(block)], [h / total for h in hist],
                    width=width, color=f"C{n}", label=method)
    axes[0].set(title="P(slot k accepted | cycle)", xlabel="block slot k", ylim=(0, 1.02), xticks=range(1, block))
    axes[1].set(title="accepted drafts per cycle", xlabel="a(s)", ylabel="fraction of cycles", xticks=range(block))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path,
                        help="a checkpoint (runs/x/checkpoints/step-N), a run directory (its latest) or runs/x/best")
    parser.add_argument("--cache", help="cache URL (default: the caches the run trained from)")
    parser.add_argument("--shards", help="comma-separated shard names (default: the run's eval shards)")
    parser.add_argument("--vp", type=Path, help="a VP drafter checkpoint or run of the same cache: also replay D2SD")
    parser.add_argument("--k", type=int, default=4, help="D2SD branches besides the DFlash draft")
    parser.add_argument("--max-samples", type=int, help="replay only the first N samples of the shards (of each cache)")
    parser.add_argument("--out", type=Path, help="output directory (default: the checkpoint directory)")
    parser.add_argument("--device", help="torch device (default: cuda if available)")
    parser.add_argument("--position-source", choices=SERVED_POSITION_SOURCES,
                        help="replay at these drafter positions, e.g. what the serving runner feeds (default: as "
                             "trained; a mixed drafter: sequential)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    evaluate_checkpoint(args.checkpoint, args.cache, args.shards, args.vp, args.k, args.max_samples, args.out, args.device,
             progress=not args.no_progress, position_source=args.position_source)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, CacheError) as e:  # a user mistake or a bad cache: one line, not a traceback
        raise SystemExit(f"train.evaluate: {e}") from None
