"""Every GPU row BENCHMARKS.md waits for, in one command, sized for a short slot on one H100 (about 8 minutes):

1. the drafter's training step at the Qwen3-VL-30B-A3B shape (hidden 2048, 5 layers, 4096 tokens, 512 anchors of
   16, full vocabulary, flex attention, bf16): step time, peak memory, TFLOP/s and MFU, for DFlash and DFlash2;
2. the cache loader with 2 workers at that hidden size against what that step consumes;
3. capture overhead and transformers' `generate` at the Qwen3-VL-8B shape (random weights, bf16).

    python bench/gpu.py [--out work/gpu-bench]     # on the GPU machine: gpu.json and gpu_rows.md in --out
    python bench/gpu.py --dry-run --out DIR        # the same code on the CPU at tiny shapes (tests/test_benches.py)

Each part runs the benchmark scripts beside this one (their children measure their own peak memory) and keeps going
if one fails, so that one slot answers as much as it can; what failed is in the JSON.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_bench import (PEAK_BF16_TFLOPS, QWEN3VL30B, SMALL, bench_cache,  # noqa: E402
                               loader_tokens_per_s, run_child)

HERE = Path(__file__).resolve().parent


def drafter_steps(dry: bool) -> list[dict]:
    base = ({"device": "cpu", "shape": "small", "seq": 256, "anchors": 16, "block": 8, "vocab": 2048, "steps": 1,
             "attention": "dense", "chunk_rows": 2048} if dry else
            {"device": "cuda", "shape": "qwen3vl30b", "seq": 4096, "anchors": 512, "block": 16, "vocab": 151936,
             "steps": 5, "attention": "flex", "chunk_rows": 2048})
    rows = []
    for arch in ("dflash", "dflash2"):
        spec = {**base, "architecture": arch}
        rows.append({**spec, **run_child(spec)})
    return rows


def loader(hidden: int, workers: int = 2) -> dict:
    root = bench_cache(hidden, 5, samples=64)
    try:
        return {"hidden": hidden, "workers": workers, "tokens_per_s": loader_tokens_per_s(root, workers)}
    finally:
        shutil.rmtree(root)


def extract_rows(dry: bool) -> dict:
    """The extraction bench's own lines (capture overhead, then generate orders), run as their own processes."""
    shape, device = ("tiny", "cpu") if dry else ("qwen3vl8b", "cuda")
    # The dry run's tiny target has heads of 16, which vLLM's CPU build refuses: its engine rows are left out.
    size = ["--samples", "4", "--batch-size", "2", "--max-new-tokens", "4", "--no-engine"] if dry else \
        ["--samples", "32", "--batch-size", "8", "--max-new-tokens", "64"]
    out = {}
    for name, extra in (("capture", []), ("generate", ["--regeneration"])):
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, str(HERE / "extract_bench.py"), "--shape", shape, "--device", device,
                               *size, *extra], capture_output=True, text=True, timeout=900)
        out[name] = {"seconds": time.perf_counter() - t0, "exit": done.returncode,
                     "lines": [ln for ln in done.stdout.splitlines() if ln.strip()][-12:],
                     **({"error": done.stderr[-2000:]} if done.returncode else {})}
    return out


def rows_markdown(result: dict) -> str:
    """The BENCHMARKS.md rows of one run."""
    device = result["device"]
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device), None)
    lines = [f"### {result['date']}, {device} (`python bench/gpu.py`{' --dry-run' if result['dry_run'] else ''})", "",
             "| drafter | shape | seq | anchors x block | step ms | peak GB | TFLOP/s | MFU |", "|---|---|---|---|---|---|---|---|"]
    for r in result["steps"]:
        if "error" in r:
            lines.append(f"| {r['architecture']} | {r['shape']} | failed: {r['error']} |")
            continue
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        lines.append(f"| {r['architecture']} | {r['shape']} | {r['seq']} | {r['anchors']} x {r['block']} | "
                     f"{1000 * r['step_s']:.0f} | {r['peak_gb']:.2f} | {r['tflops']:.2f} | {mfu} |")
    first = next((r for r in result["steps"] if "tokens_per_s" in r), None)
    if first and "tokens_per_s" in result["loader"]:
        load = result["loader"]
        lines += ["", f"Cache loader, {load['workers']} workers, hidden {load['hidden']} x 5 layers: "
                      f"{load['tokens_per_s']:.0f} tok/s against the DFlash step's {first['tokens_per_s']:.0f} "
                      f"(loader/step {load['tokens_per_s'] / first['tokens_per_s']:.2f}x)."]
    for name, part in result["extract"].items():
        lines += ["", f"Extraction bench, {name} ({part['seconds']:.0f} s" +
                  (f", FAILED exit {part['exit']})" if part["exit"] else "):"), "", "```", *part["lines"], "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("work/gpu-bench"))
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU: checks the script, no figures")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("bench/gpu.py: no CUDA device (use --dry-run to check the script on a CPU)")
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d"), "dry_run": args.dry_run,
              "device": "CPU" if args.dry_run else torch.cuda.get_device_name(), "torch": torch.__version__}
    result["steps"] = drafter_steps(args.dry_run)
    hidden = (SMALL if args.dry_run else QWEN3VL30B)["hidden_size"]
    try:
        result["loader"] = loader(hidden)
    except Exception as e:  # noqa: BLE001 - one part failing must not cost the slot the others
        result["loader"] = {"error": f"{type(e).__name__}: {e}"}
    result["extract"] = extract_rows(args.dry_run)
    result["seconds"] = time.perf_counter() - started
    (args.out / "gpu.json").write_text(json.dumps(result, indent=1))
    (args.out / "gpu_rows.md").write_text(rows_markdown(result))
    print(rows_markdown(result))
    print(f"{result['seconds']:.0f} s; {args.out / 'gpu.json'} and {args.out / 'gpu_rows.md'}")


if __name__ == "__main__":
    main()
