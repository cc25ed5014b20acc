"""DFlash against DFlash2, the exponential decay against D-PACE, measured on both learned targets.

For each family (the committed learned Qwen3-VL and Qwen3.5) this writes task shards, extracts a training and a
held-out cache, trains every arm with every seed on the same data and steps (the demo's tiny drafter: 2 layers,
block 8; DFlash2 at its published settings 2 / 16 / 256 / 16) and replays each on the held-out cache (last-turn tau,
train.evaluate). The best arm by mean tau also trains a VP drafter of its own kind (seed 0) for its D2SD tau. Step
time is measured side by side in this process: every arm's step (forward, backward, AdamW) on one batch of the
training cache, in turn, one thread. Jobs run two at a time, one thread each.

    python bench/drafter_arms_bench.py [--work work/arms-bench] [--seeds 0 1 2] [--steps 600] [--families ...]
"""

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from bench.position_source_bench import run_pairs  # noqa: E402
from cache_schema import CacheReader  # noqa: E402
from tools.demo import scenes  # noqa: E402
from tools.demo.pipeline import COMMITTED, DRAFTER_LR  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARMS = {
    "dflash-decay": (),
    "dflash-dpace": ("objective.weighting=dpace",),
    "dflash2-dpace": ("drafter.architecture=dflash2", "objective.weighting=dpace"),
    "dflash2-decay": ("drafter.architecture=dflash2",),
}


def parameters(run: Path) -> int:
    ckpt = sorted((run / "checkpoints").iterdir())[-1] / "model.safetensors"
    return sum(t.numel() for t in load_file(str(ckpt)).values())


def step_times(cache: Path, steps: int) -> dict[str, float]:
    """Median seconds of one training step per arm, the arms taking turns on the same batch, one thread."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from train.caches import open_caches
    from train.data import CacheDataset, batch_loader, epoch_batches
    from train.drafter_from_cache import resolve_drafter
    from train.loop import make_objective
    from train.model import Drafter

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        built = {}
        for arm, overrides in ARMS.items():
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = OmegaConf.to_object(compose("train", overrides=["setup=tiny", f"data.cache={cache}",
                                                                      "run_dir=unused", *overrides]))
            reader = open_caches(cfg.data.sources())[0]
            drafter = resolve_drafter(cfg, reader)
            head = reader.head_tensors()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model = Drafter(drafter, head["embed_tokens"], head["lm_head"])
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
            objective = make_objective(cfg, drafter, model.lm_head_VH, None, torch.device("cpu"), total_steps=steps)
            dataset = CacheDataset(reader, reader.shards, drafter.position_source)
            batch = next(iter(batch_loader(dataset, epoch_batches(dataset, cfg.data, 0, 0)[:1], 0)))
            built[arm] = (model, opt, objective, batch)
        times: dict[str, list[float]] = {arm: [] for arm in ARMS}
        for k in range(steps + 1):  # step 0 warms up and is not counted
            for arm, (model, opt, objective, batch) in built.items():
                t0 = time.perf_counter()
                loss, stats = objective.loss(model, batch, objective.blocks(batch, k), step=k)
                (loss / stats["weight"].clamp_min(1e-8)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if k:
                    times[arm].append(time.perf_counter() - t0)
        return {arm: statistics.median(t) for arm, t in times.items()}
    finally:
        torch.set_num_threads(threads)


def bench_family(family: str, args, env: dict) -> dict:
    work = args.work.resolve() / family
    target_dir, target_conf = COMMITTED[family]
    model = target_dir / "model"
    py = sys.executable
    caches, jobs = {}, []
    for split, n in (("train", args.train_prompts), ("heldout", args.heldout_prompts)):
        shards = scenes.write_task_shards(work / "shards", split, n)
        caches[split] = work / f"cache-{split}"
        if not (caches[split] / "summary.json").exists():
            jobs.append([py, "-m", "extract", f"target={target_conf}", f"target.path={model}", f"out={caches[split]}",
                         f"data.shards='{','.join(map(str, shards))}'", "generation.max_new_tokens=96",
                         "generation.batch_size=16", "progress=false", f"hydra.run.dir={work}/logs/extract-{split}"])
    run_pairs(jobs, env)

    def train(path: Path, seed: int, *overrides: str) -> list[str]:
        return [py, "-m", "train", "setup=tiny", f"data.cache={caches['train']}", f"run_dir={path}", f"seed={seed}",
                f"optim.max_steps={args.steps}", f"optim.lr={DRAFTER_LR}", "eval_every=0", "save_every=0",
                "data.eval_shards=0", "progress=false", f"hydra.run.dir={path}-hydra", *overrides]

    heldout = ",".join(CacheReader(str(caches["heldout"])).shards)

    def evaluate(path: Path, out: Path, *extra: str) -> list[str]:
        return [py, "-m", "train.evaluate", str(path), "--cache", str(caches["heldout"]), "--out", str(out),
                "--no-progress", "--shards", heldout, *extra]

    runs = {(arm, seed): work / "runs" / f"{arm}-seed{seed}" for arm in ARMS for seed in args.seeds}
    run_pairs([train(path, seed, *ARMS[arm]) for (arm, seed), path in runs.items()
               if not (path / "checkpoints").exists()], env)
    outs = {key: work / "eval" / path.name for key, path in runs.items()}
    run_pairs([evaluate(runs[key], out) for key, out in outs.items() if not (out / "eval.json").exists()], env)
    tau = {key: json.loads((out / "eval.json").read_text())["dflash"]["last_turn"]["tau"] for key, out in outs.items()}
    mean = {arm: statistics.mean(tau[arm, s] for s in args.seeds) for arm in ARMS}
    best = max(mean, key=mean.get)
    vp, d2sd_out = work / "runs" / f"{best}-vp", work / "eval" / f"{best}-d2sd"
    if not (vp / "checkpoints").exists():
        run_pairs([train(vp, args.seeds[0], *ARMS[best], "objective=vp")], env)
    if not (d2sd_out / "eval.json").exists():
        run_pairs([evaluate(runs[best, args.seeds[0]], d2sd_out, "--vp", str(vp))], env)
    d2sd = json.loads((d2sd_out / "eval.json").read_text())["d2sd"]["last_turn"]["tau"]
    return {"tau": {f"{a}|{s}": t for (a, s), t in tau.items()}, "mean": mean, "best": best, "d2sd": d2sd,
            "best_seed0": tau[best, args.seeds[0]],
            "params": {arm: parameters(runs[arm, args.seeds[0]]) for arm in ARMS},
            "step_s": step_times(caches["train"], args.timed_steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/arms-bench"))
    parser.add_argument("--families", nargs="+", default=list(COMMITTED), choices=list(COMMITTED))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--train-prompts", type=int, default=1024)
    parser.add_argument("--heldout-prompts", type=int, default=48)
    parser.add_argument("--timed-steps", type=int, default=20)
    args = parser.parse_args()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results = {}
    for family in args.families:
        r = results[family] = bench_family(family, args, env)
        base = r["step_s"]["dflash-decay"]
        print(f"\n{family}: last-turn tau on {args.heldout_prompts} held-out prompts, {args.steps} steps, seeds "
              f"{args.seeds}\n")
        print("| arm | " + " | ".join(f"seed {s}" for s in args.seeds) +
              " | mean | worst | vs dflash-decay (mean) | parameters | step ms (vs dflash-decay) |")
        print("|---" * (len(args.seeds) + 6) + "|")
        for arm in ARMS:
            taus = [r["tau"][f"{arm}|{s}"] for s in args.seeds]
            print(f"| {arm} | " + " | ".join(f"{t:.3f}" for t in taus) +
                  f" | {r['mean'][arm]:.3f} | {min(taus):.3f} | {r['mean'][arm] / r['mean']['dflash-decay'] - 1:+.1%}"
                  f" | {r['params'][arm]:,} | {1000 * r['step_s'][arm]:.1f} ({r['step_s'][arm] / base:.2f}x) |")
        print(f"\nbest arm {r['best']}: D2SD tau {r['d2sd']:.3f} with its VP drafter (seed {args.seeds[0]}; "
              f"alone {r['best_seed0']:.3f}, {r['d2sd'] / r['best_seed0'] - 1:+.1%})")
    (args.work / "arms_bench.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
