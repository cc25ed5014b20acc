"""`make demo`: the whole pipeline on a tiny Qwen3-VL built from the real classes and generated shards.

Every stage runs through its real command line, as a user would type it.
"""

import argparse
import os
import subprocess
import sys
from pathlib import Path

from tools.demo_shards import write_shards
from tools.tiny_targets import build_target


def step(title: str, cmd: list[str], env: dict) -> None:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    subprocess.run(cmd, check=True, env=env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=Path("work/demo"))
    parser.add_argument("--samples", type=int, default=24, help="samples per input shard")
    args = parser.parse_args()
    work = args.work.resolve()
    targets, shards, cache = work / "targets", work / "shards", work / "cache"
    env = {**os.environ, "DFLASH_TINY_TARGETS": str(targets), "HF_HUB_OFFLINE": "1"}

    print(f"=== building the tiny qwen3_vl target in {targets} and 3 webdataset shards in {shards}")
    build_target("qwen3_vl", targets)
    write_shards(shards, shards=3, samples=args.samples, seed=0)

    py = sys.executable
    step("extract: greedy regeneration and hidden-state capture", [
        py, "-m", "extract", "target=tiny", f"out={cache}", f"data.shards='{shards}/train-{{000000..000002}}.tar'",
        "generation.max_new_tokens=48", f"hydra.run.dir={work}/logs/extract"], env)
    step("inspect the cache", [py, "-m", "tools.inspect_cache", str(cache), "--verify", "--sample", "1",
                               "--plot", str(work / "cache_lengths.png")], env)
    # The target is not needed from here on: training reads the cache alone.
    step("train a DFlash drafter from the cache", [
        py, "-m", "train", "setup=tiny", f"data.cache={cache}", f"run_dir={work}/run",
        f"hydra.run.dir={work}/logs/train"], env)
    step("plot the training curves", [py, "-m", "tools.plot_run", str(work / "run")], env)
    print(f"\ndemo done: cache in {cache} (histograms: {work / 'cache_lengths.png'}); drafter checkpoints, "
          f"metrics.jsonl and curves.png in {work / 'run'}")


if __name__ == "__main__":
    main()
