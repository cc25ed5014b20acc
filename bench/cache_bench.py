"""Cache layout benchmark: write and random-order read throughput, bytes per token.

Compares, on the same synthetic samples in one run, our zarr shards for each codec and token-chunk size
(bf16 and fp8) against the layout other tools use: one safetensors file per sample.

    python bench/cache_bench.py [--samples 96] [--hidden 1024] [--layers 5] [--out DIR]

Hidden states are synthetic but shaped like a residual stream (heavy tails, a few outlier channels), which
matters for compression. Reads follow writes, so the OS page cache serves both layouts alike; the numbers
compare layouts, not disks.
"""

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cache_schema import CacheReader, CacheWriter, Manifest, Sample, StorageInfo, TargetInfo  # noqa: E402


def synthetic_samples(n: int, layers: int, hidden: int, mean_len: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    channel_scale = torch.exp(torch.randn(layers, hidden, generator=g) * 0.5)
    channel_scale[:, :4] *= 50
    out = []
    for i in range(n):
        t = int(np.clip(rng.lognormal(np.log(mean_len), 0.6), 16, 8 * mean_len))
        x = torch.distributions.StudentT(4.0).sample((t, layers, hidden)) * channel_scale
        out.append(Sample(key=f"s{i:05d}", input_ids=rng.integers(0, 1000, t).astype(np.int32),
                          loss_mask=rng.random(t) < 0.6, position_ids=np.tile(np.arange(t, dtype=np.int32), (3, 1)),
                          hidden_TLH=x.to(torch.bfloat16)))
    return out


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bench_zarr(root: Path, samples, layers, hidden, dtype, compression, chunk, per_shard=32) -> dict:
    manifest = Manifest(target=TargetInfo("bench", "qwen3", 36, hidden, 1000, "bench"),
                        target_layer_ids=list(range(1, layers + 1)),
                        storage=StorageInfo(hidden_dtype=dtype, chunk_tokens=chunk, compression=compression))
    t0 = time.perf_counter()
    writer = CacheWriter(str(root), manifest)
    for s in range(0, len(samples), per_shard):
        shard = writer.shard(f"shard-{s // per_shard:04d}")
        for sample in samples[s:s + per_shard]:
            shard.add(sample)
        shard.commit()
    write_s = time.perf_counter() - t0
    reader = CacheReader(str(root))
    order = np.random.default_rng(1).permutation(len(samples))
    t0 = time.perf_counter()
    for i in order:
        reader[int(i)].hidden_TLH.sum()
    return {"write_s": write_s, "read_s": time.perf_counter() - t0, "bytes": dir_bytes(root)}


def bench_safetensors(root: Path, samples) -> dict:
    root.mkdir(parents=True)
    t0 = time.perf_counter()
    for s in samples:
        save_file({"hidden": s.hidden_TLH, "input_ids": torch.from_numpy(s.input_ids),
                   "loss_mask": torch.from_numpy(s.loss_mask), "position_ids": torch.from_numpy(s.position_ids)},
                  str(root / f"{s.key}.safetensors"))
    write_s = time.perf_counter() - t0
    order = np.random.default_rng(1).permutation(len(samples))
    t0 = time.perf_counter()
    for i in order:
        load_file(str(root / f"{samples[i].key}.safetensors"))["hidden"].sum()
    return {"write_s": write_s, "read_s": time.perf_counter() - t0, "bytes": dir_bytes(root)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=96)
    parser.add_argument("--mean-len", type=int, default=400)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    torch.manual_seed(0)
    samples = synthetic_samples(args.samples, args.layers, args.hidden, args.mean_len)
    tokens = sum(len(s) for s in samples)
    raw_mb = tokens * args.layers * args.hidden * 2 / 1e6
    print(f"{len(samples)} samples, {tokens} tokens, {args.layers} layers x {args.hidden} hidden, "
          f"{raw_mb:.0f} MB of bf16 hidden states")
    configs = [("bf16", c, k) for c in ("none", "zstd", "blosc_lz4") for k in (64, 256, 1024)]
    configs += [("fp8_e4m3", "none", 256), ("fp8_e4m3", "zstd", 256)]
    scratch = Path(args.out or tempfile.mkdtemp(prefix="cache_bench_"))
    rows = []
    base = bench_safetensors(scratch / "safetensors", samples)
    rows.append(("safetensors/sample", "-", "-", base))
    shutil.rmtree(scratch / "safetensors")
    for dtype, comp, chunk in configs:
        root = scratch / f"{dtype}-{comp}-{chunk}"
        rows.append((dtype, comp, chunk, bench_zarr(root, samples, args.layers, args.hidden, dtype, comp, chunk)))
        shutil.rmtree(root)
    print("\n| layout | codec | chunk tokens | write MB/s | read MB/s | read tok/s | bytes/token | size vs "
          "safetensors | read speed vs safetensors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for dtype, comp, chunk, r in rows:
        print(f"| {dtype} | {comp} | {chunk} | {raw_mb / r['write_s']:.0f} | {raw_mb / r['read_s']:.0f} | "
              f"{tokens / r['read_s']:.0f} | {r['bytes'] / tokens:.0f} | {r['bytes'] / base['bytes']:.3f} | "
              f"{base['read_s'] / r['read_s']:.2f}x |")
    if args.out is None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
