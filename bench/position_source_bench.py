"""Which drafter positions to train with, measured: token index, axis 0 of the M-RoPE ids, or a per-sample mix.

Serving runners feed a drafter different 1-D positions beside an M-RoPE target: SGLang and vLLM's default (V2)
runner the token index, vLLM's V1 runner axis 0 of the target's M-RoPE ids (docs/decisions.md). A drafter trained
with one and served with the other loses acceptance once images are in context. This trains, for each seed, a
drafter with each source (`drafter.position_source=sequential | mrope_axis0 | mixed`) on one cache of the committed
learned target and replays each on the held-out cache under both served sources (`train.evaluate
--position-source`), last-turn tau. The scene images are enlarged (`--scale`) so that each carries more tokens
than positions: at scale 2 an image is 16 tokens and advances axis 0 by 4, where the demo's take 4 and 2.

    python bench/position_source_bench.py [--work work/position-bench] [--seeds 0 1 2] [--steps 400]
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_schema import CacheReader  # noqa: E402
from tools.demo import scenes  # noqa: E402
from tools.demo.pipeline import COMMITTED_TARGET  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SOURCES = ("sequential", "mrope_axis0", "mixed")
SERVED = ("sequential", "mrope_axis0")


def run_pairs(cmds: list[list[str]], env: dict) -> None:
    """Two at a time (one core each); stops on the first failure with its output's tail."""
    for i in range(0, len(cmds), 2):
        procs = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in cmds[i:i + 2]]
        for cmd, proc in zip(cmds[i:i + 2], procs):
            out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"failed: {' '.join(cmd)}\n{out[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/position-bench"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--train-prompts", type=int, default=512)
    parser.add_argument("--heldout-prompts", type=int, default=48)
    parser.add_argument("--scale", type=int, default=2)
    args = parser.parse_args()
    work = args.work.resolve()
    py = sys.executable
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    model = COMMITTED_TARGET / "model"
    caches = {}
    jobs = []
    for split, n in (("train", args.train_prompts), ("heldout", args.heldout_prompts)):
        shards = scenes.write_task_shards(work / "shards", split, n, scale=args.scale)
        caches[split] = work / f"cache-{split}"
        if not (caches[split] / "summary.json").exists():
            jobs.append([py, "-m", "extract", "target=learned", f"target.path={model}", f"out={caches[split]}",
                         f"data.shards='{','.join(map(str, shards))}'", "generation.max_new_tokens=96",
                         "generation.batch_size=16", "progress=false", f"hydra.run.dir={work}/logs/extract-{split}"])
    run_pairs(jobs, env)
    runs = {(seed, src): work / "runs" / f"{src}-seed{seed}" for seed in args.seeds for src in SOURCES}
    run_pairs([[py, "-m", "train", "setup=tiny", f"data.cache={caches['train']}", f"run_dir={path}",
                f"drafter.position_source={src}", f"seed={seed}", f"optim.max_steps={args.steps}", "optim.lr=3e-3",
                "eval_every=0", "save_every=0", "data.eval_shards=0", "progress=false",
                f"hydra.run.dir={work}/logs/train-{src}-{seed}"]
               for (seed, src), path in runs.items() if not (path / "checkpoints").exists()], env)
    heldout = ",".join(CacheReader(str(caches["heldout"])).shards)
    jobs, outs = [], {}
    for (seed, src), path in runs.items():
        for served in SERVED:
            outs[seed, src, served] = out = work / "eval" / f"{src}-seed{seed}-as-{served}"
            if not (out / "eval.json").exists():
                jobs.append([py, "-m", "train.evaluate", str(path), "--cache", str(caches["heldout"]), "--out",
                             str(out), "--position-source", served, "--no-progress", "--shards", heldout])
    run_pairs(jobs, env)
    tau = {key: json.loads((out / "eval.json").read_text())["dflash"]["last_turn"]["tau"] for key, out in outs.items()}
    print(f"\nlast-turn tau on {args.heldout_prompts} held-out prompts (images x{args.scale}), {args.steps} steps\n")
    print("| trained with | seed | served: token index | served: M-RoPE axis 0 |\n|---|---|---|---|")
    for src in SOURCES:
        for seed in args.seeds:
            print(f"| {src} | {seed} | {tau[seed, src, 'sequential']:.3f} | {tau[seed, src, 'mrope_axis0']:.3f} |")
    print("\n| trained with | served: token index, mean (vs the specialist) "
          "| served: axis 0, mean (vs the specialist) |\n|---|---|---|")
    mean = {(src, served): sum(tau[s, src, served] for s in args.seeds) / len(args.seeds)
            for src in SOURCES for served in SERVED}
    for src in SOURCES:
        cells = [f"{mean[src, served]:.3f} ({mean[src, served] / mean[served, served]:.1%})" for served in SERVED]
        print(f"| {src} | {cells[0]} | {cells[1]} |")
    worst = {served: min(tau[s, "mixed", served] / tau[s, served, served] for s in args.seeds) for served in SERVED}
    print(f"\nmixed vs the specialist, worst seed: token index {worst['sequential']:.1%}, "
          f"axis 0 {worst['mrope_axis0']:.1%}")
    (work / "position_bench.json").write_text(json.dumps({f"{s}|{src}|{sv}": t for (s, src, sv), t in tau.items()},
                                                        indent=1))


if __name__ == "__main__":
    main()
