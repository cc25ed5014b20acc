"""Training-step benchmark: step time and peak memory over anchors x block x sequence x vocabulary, chunked
against unchunked loss, dense mask against flex attention (CUDA), and cache-loader throughput against what a
step consumes. Every configuration runs in its own child process so peak memory is its own.

    python bench/train_bench.py                 # CPU grid with a small drafter, loader ratio
    python bench/train_bench.py --gpu           # Qwen3-VL-30B-A3B-shaped drafter at bf16 on CUDA
"""

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.config import DrafterConfig, ObjectiveConfig  # noqa: E402
from train.data import CacheDataset, batch_loader, padded_length, token_budget_batches  # noqa: E402
from train.model import Drafter  # noqa: E402
from train.metrics import step_metrics  # noqa: E402
from train.objective import Objective, draft_vocab  # noqa: E402

SMALL = dict(hidden_size=256, num_layers=1, num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             intermediate_size=768)
QWEN3VL30B = dict(hidden_size=2048, num_layers=5, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                  intermediate_size=6144, rope_theta=5e6)


# Dense bf16 tensor-core peak (no sparsity) of the GPUs we measure on, for MFU.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0}


def step_flops(cfg: DrafterConfig, seq: int, anchors: int, scored_rows: int, vocab: int, layers_in: int) -> float:
    """Matmul FLOPs of one training step, 2 per multiply-add. Backward costs twice the forward for trainable
    matmuls; the frozen head's backward only needs the input gradient (once the forward). Each block query sees
    on average half the context (anchors are spread uniformly) plus its own block."""
    H, h, kv, d, inter = (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                          cfg.intermediate_size)
    q = anchors * cfg.block_size
    fuse = 2 * seq * layers_in * H * H
    per_layer = (2 * seq * H * 2 * kv * d  # context keys and values
                 + 2 * q * H * (h * d + 2 * kv * d) + 2 * q * h * d * H  # block q, k, v, o
                 + 2 * q * 3 * H * inter  # MLP
                 + 2 * 2 * q * h * d * (seq / 2 + cfg.block_size))  # scores and values
    head = 2 * scored_rows * H * vocab
    extra = 0
    if cfg.architecture == "dflash2":  # both sublayers' kernel projections; the selector on the scored rows
        per_layer += 2 * 2 * q * H * 2 * cfg.conv_kernel_size * (H // cfg.conv_group_size)
        extra = 2 * scored_rows * cfg.selector_rank * (H + 2 * cfg.selector_top_k)
    return 3 * (fuse + cfg.num_layers * per_layer + extra) + 2 * head


def one_config(spec: dict) -> dict:
    """Build a drafter and a synthetic batch, run warm-up + timed steps, return time and peak memory."""
    device = spec["device"]
    torch.manual_seed(0)
    layers, T, V = 5, spec["seq"], spec["vocab"]
    dims = {**(QWEN3VL30B if spec["shape"] == "qwen3vl30b" else SMALL)}
    cfg = DrafterConfig(vocab_size=V, target_layer_ids=list(range(layers)), block_size=spec["block"],
                        mask_token_id=V - 1, architecture=spec.get("architecture", "dflash"), **dims)
    H = cfg.hidden_size
    model = Drafter(cfg, (torch.randn(V, H) * 0.02).bfloat16(), (torch.randn(V, H) * 0.02).bfloat16()).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, V - 1, (1, T), device=device)
    mask = torch.rand(1, T, device=device) < 0.7
    batch = {"input_ids": ids, "loss_mask": mask, "positions": torch.arange(T, device=device)[None],
             "hidden": torch.randn(1, T, layers, H, device=device).to(torch.bfloat16),
             "lengths": torch.tensor([T], device=device), "sample_ids": torch.tensor([0], device=device)}
    draft_ids = draft_vocab(torch.bincount(ids[mask].cpu(), minlength=V), spec["draft_vocab"]).to(device) \
        if spec.get("draft_vocab") else None
    objective = Objective(ObjectiveConfig(gamma=7.0, num_anchors=spec["anchors"],
                                          loss_chunk_rows=spec["chunk_rows"] or 1 << 30),
                          block_size=cfg.block_size, mask_id=V - 1, head_VH=model.lm_head_VH, draft_ids=draft_ids,
                          backend=spec["attention"])
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                   enabled=False)

    def step(k):
        # The training loop's step: the shared objective, step-weight normalisation, the finite-gradient check.
        blocks = objective.blocks(batch, k)
        with autocast:
            loss_sum, stats = objective.loss(model, batch, blocks)
        (loss_sum / stats["weight"].clamp_min(1e-8)).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if torch.isfinite(grad_norm):
            opt.step()
        opt.zero_grad(set_to_none=True)
        step_metrics(stats)

    for k in range(2):
        step(k)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    n = spec["steps"]
    for k in range(n):
        step(2 + k)
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / n
    scored = int((objective.blocks(batch, 0).weights_BQ > 0).sum())
    out = {"step_s": dt, "tokens_per_s": T / dt,
           "tflops": step_flops(cfg, T, spec["anchors"], scored, V if draft_ids is None else draft_ids.numel(),
                                layers) / dt / 1e12}
    if device == "cuda":
        out["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def run_child(spec: dict) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=subprocess.PIPE,
                            text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        return {"error": f"exit {status}"}
    result = json.loads(out.strip().splitlines()[-1])
    result.setdefault("peak_gb", usage.ru_maxrss / 2**20)  # CPU: the child's peak resident set
    return result


def bench_cache(hidden: int, layers: int, samples: int = 192) -> str:
    """A bf16 + zstd cache of `samples` random conversations of 200-1200 tokens, in two shards."""
    from cache_schema import CacheWriter, Manifest, Sample, StorageInfo, TargetInfo

    root = tempfile.mkdtemp(prefix="train_bench_cache_")
    manifest = Manifest(TargetInfo("bench", "qwen3", 36, hidden, 4096, "x"), list(range(layers)), StorageInfo())
    writer = CacheWriter(root, manifest)
    g = torch.Generator().manual_seed(0)
    for s in range(2):
        shard = writer.shard(f"s{s}")
        for i in range(samples // 2):
            t = int(torch.randint(200, 1200, (1,), generator=g))
            shard.add(Sample(f"{s}-{i}", torch.randint(0, 4096, (t,)).int().numpy(), (torch.rand(t) < .6).numpy(),
                             torch.arange(t).int().expand(3, t).numpy(), torch.randn(t, layers, hidden).bfloat16()))
        shard.commit()
    return root


class CopiedBatches(CacheDataset):
    """The collation before `CacheDataset.batch`, for comparison (same reader): each sample read into its own
    arrays, then copied into a zero-filled batch (in a worker, torch then copies that into shared memory to
    send it)."""

    def batch(self, indices: list[int]) -> dict:
        ids = [self.index[i] for i in indices]
        samples = self.reader.read_samples(ids)
        B, T = len(ids), padded_length([len(s.input_ids) for s in samples])
        L, H = samples[0].hidden_TLH.shape[1:]
        out = {"input_ids": torch.zeros(B, T, dtype=torch.long), "loss_mask": torch.zeros(B, T, dtype=torch.bool),
               "positions": torch.zeros(B, T, dtype=torch.long),
               "hidden": torch.zeros(B, T, L, H, dtype=torch.bfloat16),
               "lengths": torch.tensor([len(s.input_ids) for s in samples]), "sample_ids": torch.tensor(ids)}
        for b, s in enumerate(samples):
            n = len(s.input_ids)
            out["input_ids"][b, :n] = torch.from_numpy(s.input_ids)
            out["loss_mask"][b, :n] = torch.from_numpy(s.loss_mask)
            out["positions"][b, :n] = torch.from_numpy(s.position_ids[0])
            out["hidden"][b, :n] = s.hidden_TLH
        return out


def loader_tokens_per_s(root: str, workers: int, copied: bool = False) -> float:
    """Tokens/s the cache DataLoader delivers (random token-budget batches, `workers` processes); `copied`:
    batches assembled as `CopiedBatches` does."""
    from cache_schema import CacheReader

    ds = (CopiedBatches if copied else CacheDataset)(CacheReader(root), ["s0", "s1"], "mrope_axis0")
    batches, _ = token_budget_batches(ds.lengths, 8192, 8192, 64, 0, 0)
    # Steady state: the clock starts once every worker has delivered its first batch (start-up excluded).
    tokens, t0 = 0, None
    for k, batch in enumerate(batch_loader(ds, batches, workers)):
        if k == max(workers, 1) - 1:
            t0 = time.perf_counter()
        elif t0 is not None:
            tokens += int(batch["lengths"].sum())
    if not tokens:
        raise ValueError(f"{len(batches)} batches are too few to measure {workers} workers past start-up")
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--child")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers for the loader ratio")
    parser.add_argument("--quick", action="store_true", help="GPU: only the first configuration")
    parser.add_argument("--loader-only", type=int, metavar="HIDDEN",
                        help="only the cache loader, at this hidden size x 5 layers, for 0..--workers workers, "
                        "beside the collation before CacheDataset.batch")
    args = parser.parse_args()
    if args.loader_only:
        root = bench_cache(args.loader_only, 5)
        print(f"cache loader, hidden {args.loader_only} x 5 layers, bf16 zstd, tok/s: batches read straight into "
              f"their tensors (CacheDataset.batch) / samples copied into a batch (the collation before)")
        for workers in range(args.workers + 1):
            # Alternated, each twice: this machine's speed drifts within a run.
            new, old = [], []
            for _ in range(2):
                new.append(loader_tokens_per_s(root, workers))
                old.append(loader_tokens_per_s(root, workers, copied=True))
            print(f"{workers} workers: {max(new):.0f} / {max(old):.0f} = {max(new) / max(old):.2f}x", flush=True)
        shutil.rmtree(root)
        return
    if args.child:
        print(json.dumps(one_config(json.loads(args.child))))
        return
    if args.gpu:
        base = {"device": "cuda", "shape": "qwen3vl30b", "seq": 4096, "anchors": 512, "block": 16,
                "vocab": 151936, "steps": 5}
        grid = [{**base, "attention": a, "chunk_rows": c} for a in ("flex", "dense") for c in (2048, None)]
        grid += [{**base, "attention": "flex", "chunk_rows": 2048, "seq": 8192},
                 {**base, "attention": "flex", "chunk_rows": 2048, "anchors": 1024}]
        grid = grid[:1] if args.quick else grid
    else:
        base = {"device": "cpu", "shape": "small", "attention": "dense", "steps": 2}
        grid = [{**base, "seq": s, "anchors": a, "block": b, "vocab": v, "chunk_rows": 2048}
                for s in (512, 2048) for a in (64, 256) for b in (8, 16) for v in (4096, 32768)]
        grid += [{**base, "seq": 2048, "anchors": 256, "block": 16, "vocab": 32768, "chunk_rows": None},
                 {**base, "seq": 2048, "anchors": 256, "block": 16, "vocab": 32768, "chunk_rows": 2048,
                  "draft_vocab": 8192}]
    print(f"torch {torch.__version__}, {'CUDA ' + torch.cuda.get_device_name() if args.gpu else 'CPU'}")
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if args.gpu and k in torch.cuda.get_device_name()), None)
    print("| shape | attention | seq | anchors | block | vocab | draft vocab | loss chunk | step ms | tok/s | "
          "peak GB | TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    results = []
    for spec in grid:
        r = run_child(spec)
        results.append(r)
        if "error" in r:
            print(f"| {spec} | {r['error']} |")
            continue
        mfu = f"{100 * r['tflops'] / peak:.1f}%" if peak else "-"
        print(f"| {spec['shape']} | {spec['attention']} | {spec['seq']} | {spec['anchors']} | {spec['block']} | "
              f"{spec['vocab']} | {spec.get('draft_vocab') or 'full'} | {spec['chunk_rows'] or 'none'} | "
              f"{1000 * r['step_s']:.0f} | "
              f"{r['tokens_per_s']:.0f} | {r['peak_gb']:.2f} | {r['tflops']:.3f} | {mfu} |", flush=True)
    # The loader is measured at the hidden size of the first configuration and compared with its step.
    first = results[0]
    hidden = (QWEN3VL30B if grid[0]["shape"] == "qwen3vl30b" else SMALL)["hidden_size"]
    root = bench_cache(hidden, 5)
    load = loader_tokens_per_s(root, args.workers)
    shutil.rmtree(root)
    print(f"cache loader ({args.workers} workers, hidden {hidden} x 5 layers, bf16 zstd): {load:.0f} tok/s; the first "
          f"configuration's step consumes {first['tokens_per_s']:.0f} tok/s; loader/step = "
          f"{load / first['tokens_per_s']:.1f}x")


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    main()
