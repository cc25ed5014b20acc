"""Extraction overhead: our extract path against bare `generate` plus one bare forward, same model, same samples.

Both sides run in one process on the same conversations:
  bare     greedy generation of every assistant turn (batched, left padding), then one plain forward per
           final sequence (no hooks, no cache writes)
  extract  the same generation, then capture (forward hooks, 3-axis positions) + ShardWriter (bf16 words,
           zstd, crc32c) + commit

    python bench/extract_bench.py                          # tiny qwen3_vl on CPU
    python bench/extract_bench.py --shape qwen3vl8b        # Qwen3-VL-8B-shaped random weights, bf16, GPU

`--regeneration` measures greedy regeneration alone instead, batches in input order against length-sorted
windows (`generation.sort_window`), and those windows again with a static KV cache (which transformers compiles
on CUDA): generated tokens/s, decoding steps (the longest last-turn answer of each batch, summed),
conversations whose answers differ from input order's, and on a GPU the ratio to the weight-bandwidth limit
(every decoding step reads every weight once). `--shape learned` uses the committed learned target on its scene
prompts, whose answer lengths follow the dataset's as a real target's do.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import webdataset as wds
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract.capture import capture  # noqa: E402
from extract.formats import parse_sample  # noqa: E402
from extract.prompts import GenerationSettings, Prompts  # noqa: E402
from extract.regenerate import Dialog, build_sequences, regenerate_turns  # noqa: E402
from extract.batching import length_sorted_batches  # noqa: E402
from extract.run import make_manifest  # noqa: E402
from extract.config import ExtractConfig, GenerationConfig, TargetConfig  # noqa: E402
from extract.engine import EngineGenerator, engine_config  # noqa: E402
from engines import VllmWorker, vllm_python  # noqa: E402
from extract.target import Target, load_target  # noqa: E402
from cache_schema import CacheWriter  # noqa: E402
from tools.demo import scenes  # noqa: E402
from tools.demo.pipeline import COMMITTED_TARGET  # noqa: E402
from tools.fixtures.demo_shards import write_shards  # noqa: E402
from tools.fixtures.tiny_targets import build_config, build_processor, build_target, build_tokenizer  # noqa: E402

# Real Qwen3-VL-8B-Instruct dimensions (text and vision towers); weights are random.
QWEN3VL8B_TEXT = dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=151936)
QWEN3VL8B_VISION = dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                        deepstack_visual_indexes=[8, 16, 24], num_position_embeddings=2304)


def real_shape_target(device: str) -> Target:
    from transformers import AutoModelForImageTextToText

    tok = build_tokenizer()
    config = build_config("qwen3_vl", tok)
    config.text_config.update(QWEN3VL8B_TEXT)
    config.text_config.rope_parameters["mrope_section"] = [24, 20, 20]
    config.vision_config.update(QWEN3VL8B_VISION)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model.eval().requires_grad_(False)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    return Target(model=model, processor=build_processor("qwen3_vl", tok), tokenizer=tok, family="qwen3_vl",
                  name_or_path="random-qwen3vl8b-shape")


LEARNED_TARGET = COMMITTED_TARGET / "model"
CONF_TARGETS = Path(__file__).resolve().parents[1] / "conf" / "target"
# Peak memory bandwidth, bytes/s (datasheets), for the weight-bandwidth limit of a decoding step.
PEAK_BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}


def unbounded(target: Target, max_new_tokens: int) -> Prompts:
    """The target's prompts with no length limit: the bench times every conversation it is given."""
    return Prompts(target, GenerationSettings(max_new_tokens=max_new_tokens, max_length=1 << 20))


def no_skip(key, skip):
    raise AssertionError(f"bench conversation {key} skipped: {skip}")


def regeneration(target: Target, convs, batch_size: int, max_new_tokens: int, device: str,
                 engine: bool = True) -> None:
    weight_bytes = sum(p.numel() * p.element_size() for p in target.model.parameters())
    peak = next((v for k, v in PEAK_BANDWIDTH.items() if device.startswith("cuda") and k in
                 torch.cuda.get_device_name()), None)
    in_order = [convs[i:i + batch_size] for i in range(0, len(convs), batch_size)]
    in_windows = list(length_sorted_batches(convs, batch_size, 8))
    # (batches, the generation config's cache_implementation): transformers compiles the decoding step for a
    # static cache on CUDA (not on CPU, where that row shows the static cache alone), once per new shape.
    runs = {"input order": (in_order, None), "length-sorted windows of 8 batches": (in_windows, None),
            "length-sorted windows, static KV cache": (in_windows, "static")}
    answers = {}
    print("| order | batches | decoding steps | generated tokens | seconds | generated tok/s | ms per step | "
          "vs weight-bandwidth limit |\n|---|---|---|---|---|---|---|---|")
    for name, (batches, cache) in runs.items():
        target.model.generation_config.cache_implementation = cache
        build_sequences(unbounded(target, 4), convs[:2], no_skip)  # warm-up
        steps = tokens = 0
        sync(device)
        t0 = time.perf_counter()
        for batch in batches:
            seqs = build_sequences(unbounded(target, max_new_tokens), batch, no_skip)
            steps += max(len(s.answers[-1]) for s in seqs)
            tokens += sum(s.generated_tokens for s in seqs)
            answers.setdefault(name, {}).update({s.conv.key: s.answers for s in seqs})
        sync(device)
        dt = time.perf_counter() - t0
        limit = f"{(weight_bytes / peak) / (dt / steps):.2f}" if peak else "n/a (CPU)"
        print(f"| {name} | {len(batches)} | {steps} | {tokens} | {dt:.1f} | {tokens / dt:.0f} | "
              f"{1000 * dt / steps:.1f} | {limit} |")
    target.model.generation_config.cache_implementation = None
    if engine and vllm_python() is not None and Path(target.name_or_path).is_dir():
        answers.update(engine_rows(target, convs, in_order, max_new_tokens, device))
    first, *rest = answers.values()
    differ = ", ".join(f"{name}: {sum(first[k] != got[k] for k in first)}"
                       for name, got in zip(list(answers)[1:], rest))
    print(f"conversations (of {len(first)}) whose answers differ from input order's: {differ} (padding and kernels "
          "change the arithmetic; fp32 CPU ties are rare)")


def engine_rows(target: Target, convs, in_order, max_new_tokens: int, device: str) -> dict:
    """The same conversations regenerated by vLLM (`generation.engine=vllm`'s path: our rendering, PNG images, the
    worker's pipe included), fed the input-order batches, then all at once as an extraction window holds them."""
    dtype = str(target.model.dtype).removeprefix("torch.")
    cfg = ExtractConfig(out="unused", target=TargetConfig(path=target.name_or_path, dtype=dtype),
                        generation=GenerationConfig(max_new_tokens=max_new_tokens, max_length=1 << 20))
    answers = {}
    with VllmWorker(engine_config(cfg, target, device.startswith("cuda"))) as worker:
        warm = unbounded(target, 4)
        regenerate_turns(warm, [Dialog(c) for c in convs[:2]], EngineGenerator(warm, worker))
        for name, batches in {"vLLM, input-order batches": in_order, "vLLM, one window of all": [convs]}.items():
            prompts = unbounded(target, max_new_tokens)
            engine = EngineGenerator(prompts, worker)
            steps = tokens = 0
            t0 = time.perf_counter()
            for batch in batches:
                dialogs = [Dialog(c) for c in batch]
                regenerate_turns(prompts, dialogs, engine)
                steps += max(len(d.answers[-1]) for d in dialogs)
                tokens += sum(len(a) for d in dialogs for a in d.answers)
                answers.setdefault(name, {}).update({d.conv.key: d.answers for d in dialogs})
            dt = time.perf_counter() - t0
            print(f"| {name} ({worker.info['version']}, {worker.info['runner']} runner) | {len(batches)} | {steps} | "
                  f"{tokens} | {dt:.1f} | {tokens / dt:.0f} | {1000 * dt / steps:.1f} | n/a |")
    return answers


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["tiny", "learned", "qwen3vl8b"], default="tiny")
    parser.add_argument("--regeneration", action="store_true", help="time regeneration orders instead")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-engine", action="store_true", help="--regeneration without vLLM's rows")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="extract_bench_"))
    if args.shape == "tiny":
        target = load_target(str(build_target("qwen3_vl", work / "targets")), dtype="float32", device=args.device)
    elif args.shape == "learned":
        target = load_target(str(LEARNED_TARGET), dtype="float32", device=args.device)
    else:
        target = real_shape_target(args.device)
    if args.shape == "learned":
        shard = scenes.write_task_shards(work / "shards", "train", args.samples, seed=0,
                                         samples_per_shard=args.samples)[0]
    else:
        shard = write_shards(work / "shards", shards=1, samples=args.samples, seed=1)[0]
    convs = [parse_sample(r, str(shard)) for r in wds.WebDataset([str(shard)], shardshuffle=False,
                                                                    empty_check=False)]
    if args.regeneration:
        print(f"device {args.device}, target {target.name_or_path}, {len(convs)} conversations, batch "
              f"{args.batch_size}, max_new_tokens {args.max_new_tokens}")
        return regeneration(target, convs, args.batch_size, args.max_new_tokens, args.device, not args.no_engine)
    layers = target.text_config.num_hidden_layers
    layer_ids = list(OmegaConf.load(CONF_TARGETS / f"{args.shape}.yaml").layer_ids)  # what `target=SHAPE` captures
    cfg = ExtractConfig(out=str(work / "cache"), target=TargetConfig(path="bench", dtype="bfloat16"))
    writer = CacheWriter(cfg.out, make_manifest(cfg, target.model.config, target.tokenizer, layer_ids))
    shard_writer = writer.shard("bench")

    batches = [convs[i:i + args.batch_size] for i in range(0, len(convs), args.batch_size)]
    build_sequences(unbounded(target, 4), batches[0][:2], no_skip)  # warm-up: kernels, allocator
    times = dict.fromkeys(["generate", "bare_forward", "capture_write"], 0.0)
    gen_tokens = cap_tokens = 0

    def timed(key, fn):
        sync(args.device)
        t0 = time.perf_counter()
        out = fn()
        sync(args.device)
        times[key] += time.perf_counter() - t0
        return out

    def bare_forward(seqs):
        with torch.no_grad():
            for s in seqs:
                target.model(**{k: v.to(target.device) for k, v in s.inputs.items()}, use_cache=False,
                             logits_to_keep=1)

    def capture_write(seqs):
        for s in seqs:
            shard_writer.add(capture(target, s, layer_ids)[0])

    # Generation is the same code on both sides, so it runs once and counts for both; what differs is a bare
    # forward against the hooked forward plus the cache write, alternated in order per batch.
    for k, batch in enumerate(batches):
        seqs = timed("generate", lambda: build_sequences(unbounded(target, args.max_new_tokens), batch, no_skip))
        gen_tokens += sum(s.generated_tokens for s in seqs)
        cap_tokens += sum(s.inputs["input_ids"].shape[1] for s in seqs)
        steps = [("bare_forward", lambda: bare_forward(seqs)), ("capture_write", lambda: capture_write(seqs))]
        for key, fn in steps if k % 2 == 0 else steps[::-1]:
            timed(key, fn)
    timed("capture_write", shard_writer.commit)
    t_bare = times["generate"] + times["bare_forward"]
    t_ours = times["generate"] + times["capture_write"]
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    print(f"device {name}, target {target.name_or_path} ({layers} layers, hidden {target.text_config.hidden_size}), "
          f"{len(convs)} samples, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}")
    print(f"generated tokens {gen_tokens}, captured tokens {cap_tokens}")
    print(" | ".join(f"{k} {v:.2f} s" for k, v in times.items()))
    print(f"bare generate+forward: {t_bare:.2f} s | extract: {t_ours:.2f} s | "
          f"overhead {100 * (t_ours / t_bare - 1):+.1f}%")
    print(f"extract throughput: {cap_tokens / t_ours:.0f} captured tok/s, {gen_tokens / t_ours:.0f} generated tok/s")


if __name__ == "__main__":
    main()
