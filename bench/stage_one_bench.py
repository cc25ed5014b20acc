"""Stage one three ways, side by side in one run, each as a user runs it (`python -m extract`, its own process tree):

  in-process   transformers regenerates and captures (the default)
  engine+hf    vLLM regenerates, transformers captures (`generation.engine=vllm`)
  engine only  vLLM regenerates and captures; the target's weights are never loaded here
               (`generation.engine=vllm generation.capture=engine`)

Prints wall time and peak memory (the summed resident memory of the command and every process it starts, sampled
every 0.2 s) per way, and checks that the engine's caches hold what the in-process one holds: the same ids, loss
masks and positions, hidden states within the cache's bf16 rounding.

    python bench/stage_one_bench.py                                  # the learned Qwen3-VL, its scene prompts, CPU
    python bench/stage_one_bench.py --target DIR --conf qwen3vl8b --shards 'x-{000000..000003}.tar' --dtype bfloat16
"""

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from cache_schema import CacheReader  # noqa: E402
from tools.demo import scenes  # noqa: E402
from tools.demo.pipeline import COMMITTED_TARGET  # noqa: E402

WAYS = {"in-process": [], "engine+hf": ["generation.engine=vllm"],
        "engine only": ["generation.engine=vllm", "generation.capture=engine"]}


def peak_tree_rss(proc: subprocess.Popen, out: dict) -> None:
    """The largest summed RSS of `proc` and its descendants seen while it runs, into out["peak"]."""
    root, peak = psutil.Process(proc.pid), 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:  # a process ended between the listing and the reading
            pass
        time.sleep(0.2)
    out["peak"] = peak


def run(way: str, args, out: Path) -> dict:
    cmd = [sys.executable, "-m", "extract", f"target={args.conf}", f"target.path={args.target}",
           f"target.dtype={args.dtype}", f"out={out}", f"data.shards='{args.shards}'", "progress=false",
           f"generation.max_new_tokens={args.max_new_tokens}", f"generation.batch_size={args.batch_size}",
           f"hydra.run.dir={out}-logs", *WAYS[way]]
    started, seen = time.perf_counter(), {}
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watcher = threading.Thread(target=peak_tree_rss, args=(proc, seen))
    watcher.start()
    log, _ = proc.communicate()
    watcher.join()
    if proc.returncode:
        raise SystemExit(f"{way} failed:\n{log[-3000:]}")
    return {"seconds": time.perf_counter() - started, "peak_gb": seen["peak"] / 2**30}


def compare(want: CacheReader, got: CacheReader) -> str:
    if len(want) != len(got):
        return f"{len(got)} samples against {len(want)}"
    worst, other = 0.0, 0
    for i in range(len(want)):
        x, y = want[i], got[i]
        if not (x.key == y.key and (x.input_ids == y.input_ids).all() and (x.loss_mask == y.loss_mask).all()
                and (x.position_ids == y.position_ids).all()):
            other += 1
            continue
        a, b = x.hidden_TLH.float(), y.hidden_TLH.float()
        worst = max(worst, float(((a - b).norm(dim=-1) / a.norm(dim=-1).clamp_min(1e-30)).max()))
    return (f"same ids/masks/positions {len(want) - other}/{len(want)}, hidden states within {worst:.1e} relative "
            "per token")


def replayed_tau(cache: Path, reference: Path, run_dir: Path, steps: int) -> float:
    """tau of a drafter trained `steps` steps on `cache` (the tiny setup, seed 0), replayed on `reference`'s
    samples, last turns."""
    subprocess.run([sys.executable, "-m", "train", "setup=tiny", f"data.cache={cache}", f"run_dir={run_dir}",
                    f"optim.max_steps={steps}", "optim.lr=3e-3", "eval_every=0", "save_every=0", "data.eval_shards=0",
                    "progress=false", f"hydra.run.dir={run_dir}-logs"], cwd=ROOT, check=True, capture_output=True)
    shards = ",".join(CacheReader(str(reference)).shards)
    subprocess.run([sys.executable, "-m", "train.evaluate", str(run_dir), "--cache", str(reference), "--shards",
                    shards, "--out", str(run_dir / "eval"), "--no-progress"], cwd=ROOT, check=True,
                   capture_output=True)
    return json.loads((run_dir / "eval" / "eval.json").read_text())["dflash"]["last_turn"]["tau"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default=str(COMMITTED_TARGET / "model"))
    p.add_argument("--conf", default="learned", help="the target= config naming its layer ids")
    p.add_argument("--shards", help="default: the learned target's held-out scene prompts, written here")
    p.add_argument("--samples", type=int, default=64, help="scene prompts to write when --shards is not given")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--drafter-steps", type=int, default=0,
                   help="also train a drafter this many steps on the in-process and the engine-only cache and replay "
                        "both on the in-process one")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="stage-one-") as tmp:
        tmp = Path(tmp)
        if args.shards is None:
            paths = scenes.write_task_shards(tmp / "shards", "heldout", args.samples, samples_per_shard=32)
            args.shards = ",".join(map(str, paths))
        rows = {}
        for way in WAYS:
            print(f"{way} ...", flush=True)
            rows[way] = run(way, args, tmp / way.replace(" ", "-").replace("+", "-"))
        want = CacheReader(str(tmp / "in-process"))
        tokens = sum(len(want[i]) for i in range(len(want)))
        print(f"\nstage one, {len(want)} conversations ({tokens} tokens), {args.dtype}, {torch.get_num_threads()} "
              f"threads available\n  {'way':12} {'wall s':>8} {'vs in-process':>14} {'peak GB':>8}  cache")
        base = rows["in-process"]["seconds"]
        for way, r in rows.items():
            same = "the reference" if way == "in-process" else compare(
                want, CacheReader(str(tmp / way.replace(" ", "-").replace("+", "-"))))
            print(f"  {way:12} {r['seconds']:8.1f} {r['seconds'] / base:13.2f}x {r['peak_gb']:8.2f}  {same}")
        if args.drafter_steps:
            reference = tmp / "in-process"
            taus = {way: replayed_tau(tmp / name, reference, tmp / f"run-{name}", args.drafter_steps)
                    for way, name in (("in-process", "in-process"), ("engine only", "engine-only"))}
            print(f"  drafters of {args.drafter_steps} steps, replayed on the in-process cache: "
                  + ", ".join(f"trained on {way} tau {tau:.3f}" for way, tau in taus.items()))


if __name__ == "__main__":
    main()
