"""The extract loop: a deterministic map from each input shard to one committed output shard.

Restart-safe: committed output shards are skipped, an uncommitted leftover is rebuilt from scratch, so a
killed run started again with the same command ends with exactly what an uninterrupted run writes.
"""

import logging
import tempfile
import time
from collections import Counter
from itertools import islice

import torch
from accelerate import PartialState
from tqdm import tqdm
from transformers import AutoConfig

from cache_schema import CacheReader, CacheWriter, Manifest, TargetInfo
from cache_schema.layout import HEAD_FILE, TOKENIZER_DIR
from extract.capture import capture
from extract.config import ExtractConfig
from extract.formats import SkipSample
from extract.regenerate import build_sequences
from extract.sources import conversations, expand_shards, output_shard_name, shards_for_rank
from extract.target import (Target, check_layer_ids, config_fingerprint, deepstack_layers, default_layer_ids,
                            load_target, tokenizer_fingerprint)

log = logging.getLogger("extract")


def resolve_layer_ids(cfg: ExtractConfig, config) -> list[int]:
    num_layers = config.get_text_config().num_hidden_layers
    deepstack = deepstack_layers(config)
    ids = list(cfg.target.layer_ids) if cfg.target.layer_ids else default_layer_ids(
        num_layers, cfg.target.num_capture_layers, start=max(1, deepstack))
    check_layer_ids(ids, num_layers, deepstack)
    return ids


def make_manifest(cfg: ExtractConfig, target: Target, layer_ids: list[int]) -> Manifest:
    text = target.text_config
    info = TargetInfo(name_or_path=target.name_or_path, model_type=target.family,
                      num_hidden_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                      vocab_size=text.vocab_size, fingerprint=config_fingerprint(target.model.config))
    generation = {"regenerate": cfg.generation.regenerate, "max_new_tokens": cfg.generation.max_new_tokens,
                  "max_length": cfg.data.max_length, "system_prompt": cfg.target.system_prompt,
                  "enable_thinking": cfg.target.enable_thinking, "target_dtype": cfg.target.dtype,
                  "greedy": True}
    return Manifest(target=info, target_layer_ids=layer_ids, storage=cfg.storage,
                    tokenizer_fingerprint=tokenizer_fingerprint(target.tokenizer), generation=generation,
                    special_tokens=target.special_tokens)


def export_target_files(writer: CacheWriter, target: Target) -> None:
    """Head tensors and tokenizer files, once per cache, so training and inspection need no target."""
    loc = writer.loc
    if not loc.exists(HEAD_FILE):
        writer.write_head(target.head_tensors())
    if not loc.exists(TOKENIZER_DIR):
        with tempfile.TemporaryDirectory() as tmp:
            target.processor.save_pretrained(tmp)
            staging = loc.path(f"{TOKENIZER_DIR}.tmp-{time.time_ns()}")
            loc.fs.put(tmp, staging, recursive=True)
            loc.fs.mv(staging, loc.path(TOKENIZER_DIR), recursive=True)


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(islice(it, n)):
        yield batch


def run(cfg: ExtractConfig) -> dict:
    # On a CPU-only machine `accelerate launch --multi_gpu` still starts one process per rank; cpu=True
    # makes accelerate join them over gloo instead of looking for CUDA.
    state = PartialState(cpu=not torch.cuda.is_available())
    shards = expand_shards(cfg.data.shards)
    mine = shards_for_rank(shards, state.process_index, state.num_processes)
    torch.manual_seed(cfg.seed)
    layer_ids = resolve_layer_ids(cfg, AutoConfig.from_pretrained(cfg.target.path))  # refused before any loading
    target = load_target(cfg.target.path, dtype=cfg.target.dtype, device=cfg.target.device or str(state.device),
                         device_map=cfg.target.device_map, attn_implementation=cfg.target.attn_implementation,
                         model_type=cfg.target.model_type)
    writer = CacheWriter(cfg.out, make_manifest(cfg, target, layer_ids))
    if state.is_main_process:
        export_target_files(writer, target)
    done = writer.committed()
    log.info("rank %d/%d: %d of %d input shards, %d already committed", state.process_index,
             state.num_processes, len(mine), len(shards), sum(output_shard_name(u) in done for u in mine))

    totals = Counter()
    bar = tqdm(unit="sample", desc=f"extract[{state.process_index}]", disable=not cfg.progress,
               position=state.process_index)
    start = time.perf_counter()

    def on_skip(key, skip: SkipSample):
        if cfg.strict:
            raise ValueError(f"sample {key}: {skip} (strict=true stops at the first bad sample; nothing of this "
                             "shard was committed)")
        log.warning("skipped %s: %s", key, skip)

    for url in mine:
        name = output_shard_name(url)
        if name in done:
            continue
        shard = writer.shard(name)
        skips = Counter()
        for batch in batched(conversations(url, cfg.data.format, skips, on_skip), cfg.generation.batch_size):
            results = build_sequences(target, batch, cfg.generation.regenerate, cfg.generation.max_new_tokens,
                                      cfg.data.max_length, cfg.target.system_prompt, cfg.target.enable_thinking)
            for conv, result in zip(batch, results):
                if isinstance(result, SkipSample):
                    skips[result.reason] += 1
                    on_skip(conv.key, result)
                    continue
                sample = capture(target, result, layer_ids)
                shard.add(sample)
                totals["captured_tokens"] += len(sample)
                totals["generated_tokens"] += result.generated_tokens
            elapsed = time.perf_counter() - start
            bar.update(sum(not isinstance(r, SkipSample) for r in results))
            bar.set_postfix(gen_tok_s=f"{totals['generated_tokens'] / elapsed:.0f}",
                            cap_tok_s=f"{totals['captured_tokens'] / elapsed:.0f}", skipped=sum(skips.values()))
        shard.commit({"source": url, "skipped": dict(skips)})
    bar.close()
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    return write_summary(writer, cfg.out, time.perf_counter() - start)


def write_summary(writer: CacheWriter, url: str, seconds: float) -> dict:
    """Aggregate every committed shard's statistics and skip counts into summary.json and print them."""
    reader = CacheReader(url)
    skipped = Counter()
    for marker in reader.markers.values():
        skipped.update(marker.get("skipped", {}))
    summary = {**reader.stats, "skipped": dict(sorted(skipped.items())), "last_run_seconds": round(seconds, 2)}
    writer.write_summary(summary)
    lines = [f"  {k}: {v}" for k, v in summary.items() if k != "skipped"]
    lines += [f"  skipped.{k}: {v}" for k, v in summary["skipped"].items()] or ["  skipped: none"]
    print(f"extract summary for {url}\n" + "\n".join(lines), flush=True)
    return summary
