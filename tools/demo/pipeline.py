"""`make demo`: the whole pipeline on a tiny Qwen3-VL that has learned a synthetic image task; `make demo-qwen35`:
the core of it on a tiny Qwen3.5 that has learned the same task (`--family qwen3_5`).

Every stage runs through its real command line, as a user would type it: the learned target (built once and
reused), task shards (training prompts and a held-out split used for evaluation only), `extract` (bf16, fp8 and
dataset answers), `train` (DFlash and VP drafters), `train.evaluate` (offline replay and D2SD on the held-out
cache), `tools.spec_decode` (online, against the target's own greedy output), `train.export` (both formats),
`tools.serve_check` (the drafter served by vLLM beside our replay), then one table of what came out. The Qwen3.5
run leaves out the fp8, dataset-answer and DFlash2 drafters, and runs the learned Qwen3.5 with its linear-attention
heads widened to a size vLLM's CPU kernels take, in bf16 (the only dtype they run), from extraction to serving.
"""

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from cache_schema import CacheReader
from tools.demo import learned_target, linear_heads, scenes
from engines import vllm_python

# Built by `python -m tools.demo.learned_target` (9000 steps, 20-30 minutes on one thread) and committed, 3.3 MB,
# so that the demo fits its 15 minutes on a fresh clone; --rebuild-target makes it from the generator instead.
COMMITTED_TARGET = Path(__file__).parent / "assets" / "learned_target"
# Per family: the committed learned target and the `target=` config that names its layer ids.
COMMITTED = {"qwen3_vl": (COMMITTED_TARGET, "learned"),
             "qwen3_5": (Path(__file__).parent / "assets" / "learned_qwen35", "learned_qwen35")}
# Sizes that keep the whole demo within about 15 minutes on 2 CPU cores (see BENCHMARKS.md).
TRAIN_PROMPTS = 1024
HELDOUT_PROMPTS = 48
DRAFTER_STEPS = 600
DRAFTER_LR = 3e-3  # chosen on an earlier target at 150 steps (held-out tau 3.10; 2e-3: 2.71, 1e-3: 2.64), kept
MAX_NEW_TOKENS = 96
STEP_WIDTH = 56  # the console's stage column
# The newer drafter the demo trains beside DFlash: the arm bench/drafter_arms_bench.py measured best (BENCHMARKS.md).
NEW_ARM = ("dflash2-dpace", ("drafter.architecture=dflash2", "objective.weighting=dpace"))


def serve_rows(served: dict | None) -> list[tuple[str, str]]:
    """The demo table's rows of the serve check (tools/serve_check.py), or one saying why there are none."""
    if served is None:
        return [("vLLM (served)", "not run: no .venv-vllm (make setup-vllm)")]
    e, n, lossless = served["engine"], served["samples"], served["lossless"]
    return [
        (f"vLLM {served['runner']} runner: acceptance 1+acc/drafts (ours)",
         f"{e['acceptance_length']:.3f} ({served['ours']['acceptance_length']:.3f}; as served "
         f"{served['ours_as_served']['acceptance_length']:.3f})"),
        ("vLLM: tau, committed per cycle (ours)", f"{e['tau']:.3f} ({served['ours']['tau']:.3f})"),
        ("vLLM lossless (speculative == its greedy == transformers)",
         f"{'yes' if lossless['engine_vs_its_greedy'] == lossless['engine_vs_transformers'] == n else 'NO'} "
         f"({lossless['engine_vs_its_greedy']}/{n}, {lossless['engine_vs_transformers']}/{n})"),
        ("vLLM tokens/s, speculative / greedy (CPU build)",
         f"{e['tokens_per_s']:.1f} / {served['engine_greedy_tokens_per_s']:.1f}"),
        ("vLLM vs our replay", "agrees" if served["agrees"] else
         "gap: " + "; ".join(c["cause"] for c in served["causes"])),
    ]


def run_steps(jobs: list[tuple[str, list]], env: dict, logs: Path, timings: dict) -> None:
    """Run the jobs side by side (one core each), each one's command and output in `logs/TITLE.log`; one console
    line per job when it ends (what, how long, where its log is). Stops the demo, with the log's tail, if any job
    fails."""
    logs.mkdir(parents=True, exist_ok=True)
    running = []
    for title, cmd in jobs:
        cmd = [str(c) for c in cmd]
        log = logs / f"{title.replace(' ', '_')}.log"
        out = open(log, "w")
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        running.append((title, log, out, subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT),
                        time.perf_counter()))
    for title, log, out, proc, t0 in running:
        code = proc.wait()
        timings[title] = time.perf_counter() - t0
        out.close()
        if code:
            raise SystemExit(f"demo step '{title}' failed with exit code {code} (log: {log})\n"
                             f"{log.read_text()[-3000:]}")
        print(f"  {title:<{STEP_WIDTH}} {timings[title]:5.0f} s   {log}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("work/demo"))
    parser.add_argument("--steps", type=int, default=DRAFTER_STEPS, help="drafter training steps")
    parser.add_argument("--family", choices=tuple(COMMITTED), default="qwen3_vl",
                        help="which learned target: the Qwen3-VL (the whole demo) or the Qwen3.5 (its core)")
    parser.add_argument("--target-dir", type=Path,
                        help="a learned target built by tools.demo.learned_target (default: the family's committed "
                             "one)")
    parser.add_argument("--rebuild-target", action="store_true",
                        help="build the learned target from its generator instead (20-30 CPU-minutes, once)")
    args = parser.parse_args()
    work = args.work.resolve()
    committed, target_conf = COMMITTED[args.family]
    full = args.family == "qwen3_vl"
    py = sys.executable
    # One intra-op thread: the tiny models' matmuls gain nothing from two, and two threads per process slow to a
    # crawl as soon as anything else holds a core (measured 30x on extraction).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    timings: dict[str, float] = {}
    started = time.perf_counter()

    t0 = time.perf_counter()
    if args.rebuild_target:
        print("building the learned target (reused while its generator and settings are unchanged)", flush=True)
        target_dir = learned_target.ensure(work.parent / "learned-target", learned_target.settings_of(args.family))
    else:
        target_dir = args.target_dir or committed
        if not learned_target.is_build(target_dir):
            raise SystemExit(f"--target-dir {target_dir} does not hold a learned target (model/ and accuracy.json, as "
                             "`python -m tools.demo.learned_target OUT` writes them)")
    print(f"demo in {work} (every stage's log under {work / 'logs'}); learned target {target_dir}", flush=True)
    timings["learned target"] = time.perf_counter() - t0
    model, target_dtype = target_dir / "model", ()
    if not full:  # the Qwen3.5 in shapes vLLM's CPU build serves, in its only dtype (tools/demo/linear_heads.py)
        model, target_dtype = linear_heads.servable(model, work / "target"), ("target.dtype=bfloat16",)
    accuracy = json.loads((target_dir / "accuracy.json").read_text())
    shards = work / "shards"
    train_shards = scenes.write_task_shards(shards, "train", TRAIN_PROMPTS)
    heldout_shards = scenes.write_task_shards(shards, "heldout", HELDOUT_PROMPTS)
    spec = {split: ",".join(map(str, paths)) for split, paths in (("train", train_shards), ("heldout", heldout_shards))}

    logs = work / "logs"

    def run(*jobs):
        run_steps(list(jobs), env, logs, timings)

    def in_background(*jobs) -> threading.Thread:
        """Jobs run beside the stages that follow (a third process on two cores); `finish` waits for them."""
        failed = []

        def target():
            try:
                run(*jobs)
            except SystemExit as e:
                failed.append(e)
        thread = threading.Thread(target=target, daemon=True)
        thread.failed = failed
        thread.start()
        return thread

    def finish(thread: threading.Thread) -> None:
        thread.join()
        if thread.failed:
            raise thread.failed[0]

    def extract(name: str, split: str, *overrides) -> tuple[str, list]:
        return (f"extract {name}", [py, "-m", "extract", f"target={target_conf}", f"target.path={model}",
                                    f"out={work / name}", f"data.shards='{spec[split]}'",
                                    f"generation.max_new_tokens={MAX_NEW_TOKENS}", "generation.batch_size=16",
                                    f"hydra.run.dir={logs}/extract-{name}", *target_dtype, *overrides])

    def train(name: str, data: Path, *overrides) -> tuple[str, list]:
        return (f"train {name}", [py, "-m", "train", "setup=tiny", f"data.cache={data}", f"run_dir={work / 'runs' / name}",
                                  f"optim.max_steps={args.steps}", f"optim.lr={DRAFTER_LR}",
                                  f"eval_every={args.steps // 3}",
                                  f"save_every={args.steps // 3}", f"hydra.run.dir={logs}/train-{name}", *overrides])

    cache, heldout, cache_fp8, cache_human = (work / n for n in ("cache", "cache-heldout", "cache-fp8", "cache-human"))
    # Two cores: independent stages run in pairs, one thread each.
    if full:
        run(extract("cache", "train"), extract("cache-human", "train", "generation.regenerate=false"))
        run(extract("cache-fp8", "train", "storage.hidden_dtype=fp8_e4m3"), extract("cache-heldout", "heldout"))
    else:
        run(extract("cache", "train"), extract("cache-heldout", "heldout"))
    run(("inspect the cache", [py, "-m", "tools.inspect_cache", cache, "--verify", "--audit", "--sample", "1",
                               "--plot", work / "cache_lengths.png", "--audit-plot", work / "cache_audit.png"]))
    # The target is not needed from here on until speculative decoding: training reads the cache alone.
    new_arm = NEW_ARM[0]
    if full:  # the newer drafter's step costs about twice DFlash's on the CPU: it trains beside what follows
        newer = in_background(train(new_arm, cache, *NEW_ARM[1]))
    run(train("dflash", cache), train("vp", cache, "objective=vp"))
    variants = ("dflash-fp8", "dflash-human") if full else ()
    if full:
        run(train("dflash-fp8", cache_fp8), train("dflash-human", cache_human))
    runs = {name: work / "runs" / name for name in ("dflash", "vp", *variants)}
    run(*[(f"plot {name}", [py, "-m", "tools.plot_run", path]) for name, path in runs.items()])

    heldout_names = ",".join(CacheReader(str(heldout)).shards)

    def evaluate(name: str, *extra) -> tuple[str, list]:
        return (f"evaluate {name} offline on the held-out cache", [
            py, "-m", "train.evaluate", runs[name], "--cache", heldout, "--shards", heldout_names, "--out",
            work / "eval" / name, *extra])

    online_dir = work / "spec_decode"
    run(("speculative decoding online on the held-out prompts", [
        py, "-m", "tools.spec_decode", "--target", model, "--drafter", runs["dflash"],
        "--shards", spec["heldout"], "--out", online_dir]), evaluate("dflash", "--vp", runs["vp"]))
    if full:
        run(evaluate("dflash-fp8"), evaluate("dflash-human"))
    run(*[(f"export {fmt}", [py, "-m", "train.export", runs["dflash"], "--format", fmt, "--out",
                             work / "export" / fmt]) for fmt in ("speculators", "dflash")])
    # Where users end: the drafter served by vLLM (its CPU build, when `make setup-vllm` has made it) beside our replay.
    served = None
    if vllm_python() is not None:
        run(("the DFlash drafter served by vLLM beside our replay", [
            py, "-m", "tools.serve_check", "--target", model, "--drafter", runs["dflash"],
            "--shards", spec["heldout"], "--out", work / "serve_check"]))
        served = json.loads((work / "serve_check" / "serve_check.json").read_text())
    if full:
        finish(newer)
        runs[new_arm] = work / "runs" / new_arm
        run(evaluate(new_arm))
        variants = (*variants, new_arm)
    evals = {name: json.loads((work / "eval" / name / "eval.json").read_text()) for name in ("dflash", *variants)}
    online = json.loads((online_dir / "spec_decode.json").read_text())

    summary = json.loads((cache / "summary.json").read_text())
    cache_bytes = sum(f.stat().st_size for f in (cache / "shards").rglob("*") if f.is_file())

    def versus(name: str, reference: str) -> str:
        tau, ref = (evals[n]["dflash"]["last_turn"]["tau"] for n in (name, "dflash"))
        return f"{tau:.3f} ({tau / ref - 1:+.1%} vs {reference})"

    rows = [
        ("learned target held-out exact-match accuracy", f"{accuracy['exact_match']:.3f}"),
        ("tau offline (DFlash, held-out, last turn)", f"{evals['dflash']['dflash']['last_turn']['tau']:.3f}"),
        ("tau online (DFlash, held-out)", f"{online['tau']:.3f}"),
        ("lossless (online == target greedy, all prompts)", "yes" if online["lossless"] else "NO"),
        ("tau D2SD offline (DFlash + VP, k=4)", f"{evals['dflash']['d2sd']['last_turn']['tau']:.3f}"),
        *([(f"tau offline, {new_arm} drafter (same seed and steps)", versus(new_arm, "DFlash")),
           ("tau offline, drafter from the fp8 cache (same seed)", versus("dflash-fp8", "bf16")),
           ("tau offline, drafter from dataset answers", versus("dflash-human", "regenerated"))] if full else []),
        *serve_rows(served),
        ("cache audit of the hidden states (cache_audit.png)", summary["audit"]["verdict"]),
        ("cache bytes per token (bf16)", f"{cache_bytes / summary['tokens']:.0f}"),
        ("extraction time (train prompts, bf16, beside another)", f"{timings['extract cache']:.0f} s"),
        ("whole demo", f"{time.perf_counter() - started:.0f} s"),
        ("training time (DFlash, beside the VP drafter)", f"{timings['train dflash']:.0f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n=== demo results ({args.family})\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
    (work / "results.json").write_text(json.dumps(dict(rows), indent=1))
    print(f"\nwork in {work}: caches, runs/*/curves.png, eval/*/eval.png, spec_decode/, export/, results.json")
