"""The extract loop: a deterministic map from each input shard to one committed output shard.

Restart-safe: committed output shards are skipped, an uncommitted leftover is rebuilt from scratch, so a
killed run started again with the same command ends with exactly what an uninterrupted run writes. An input
shard that does not read to its end is left uncommitted and listed in the summary; the next run retries it.
"""

import contextlib
import logging
import tempfile
import time
from collections import Counter

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from transformers import AutoConfig, AutoTokenizer

from cache_schema import CacheReader, CacheWriter, Manifest, TargetInfo
from cache_schema.audit import audit
from cache_schema.disk import writing
from cache_schema.layout import SHARDS_DIR
from cache_schema.lock import held_by_main, lock_if_local
from cache_schema.stop import StopSignals, Stopped
from cache_schema.storage import Location
from extract.batching import length_sorted_batches
from extract.capture import capture
from extract.engine import answered_dialogs, load_answers, regenerate_shards, remove_answers
from extract.config import ExtractConfig
from extract.engine_capture import EngineCapture
from extract.families import family
from extract.formats import SkipSample, guarded
from extract.progress import ShardProgress
from extract.prompts import Prompts
from extract.regenerate import build_sequences
from extract.sources import IncompleteShard, conversations, expand_shards, output_shard_name, shards_for_rank
from extract.target import (Target, check_layer_ids, config_fingerprint, default_layer_ids, load_structure,
                            load_target, special_token_ids, tokenizer_fingerprint)

log = logging.getLogger("extract")


def resolve_layer_ids(cfg: ExtractConfig, config) -> list[int]:
    num_layers = config.get_text_config().num_hidden_layers
    deepstack = family(config.model_type).deepstack_layers(config)
    if cfg.target.layer_ids:
        ids = list(cfg.target.layer_ids)
    else:
        n, start = cfg.target.num_capture_layers, max(1, deepstack)
        ids = default_layer_ids(num_layers, n, start=start)
        if ids != sorted(set(ids)):
            raise ValueError(f"target.num_capture_layers={n}: the default spread over layers {start}..{num_layers - 3} "
                             f"of this {num_layers}-layer target has no {n} distinct ids ({ids}); set "
                             "target.layer_ids explicitly or capture fewer layers")
    check_layer_ids(ids, num_layers, deepstack)
    return ids


def make_manifest(cfg: ExtractConfig, config, tokenizer, layer_ids: list[int]) -> Manifest:
    """The cache identity, from the target's config and tokenizer alone: known before the model is loaded."""
    text = config.get_text_config()
    info = TargetInfo(name_or_path=str(cfg.target.path), model_type=config.model_type,
                      num_hidden_layers=text.num_hidden_layers, hidden_size=text.hidden_size,
                      vocab_size=text.vocab_size, fingerprint=config_fingerprint(config))
    return Manifest(target=info, target_layer_ids=layer_ids, storage=cfg.storage,
                    tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
                    generation=cfg.generation.settings().manifest_entry(cfg.target.dtype),
                    special_tokens=special_token_ids(tokenizer, family(config.model_type).chat))


def export_target_files(writer: CacheWriter, target: Target) -> None:
    """Head tensors and tokenizer files with their checksums, once per cache, so training and inspection need
    no target."""
    with tempfile.TemporaryDirectory() as tmp:
        target.processor.save_pretrained(tmp)
        writer.write_target_files(target.head_tensors(), tmp)


def run(cfg: ExtractConfig) -> dict:
    """Extract every input shard of this rank; the caller's thread count is restored afterwards. SIGTERM or SIGINT
    stops it between batches, raising `Stopped`: what is committed stays, the shard being written is not."""
    cfg.validate()
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        with StopSignals() as stop, contextlib.ExitStack() as hold:
            return _run(cfg, stop, hold)
    finally:
        torch.set_num_threads(threads)


def stop_here(stop: StopSignals, writer: CacheWriter, stage: str, url: str | None) -> None:
    """Raise Stopped if a stop was asked, saying what the same command will do next."""
    if stop.requested is None:
        return
    committed = len(writer.committed())
    where = (f"{output_shard_name(url)} (from {url}) was not committed and is rebuilt from its start"
             if url is not None else "nothing was left half-written")
    raise Stopped(f"stopped by {stop.requested} during {stage}: {committed} shards are committed in {writer.loc.url}; "
                  f"{where}; the same command resumes there")


def _run(cfg: ExtractConfig, stop: StopSignals, hold: contextlib.ExitStack) -> dict:
    # On a CPU-only machine `accelerate launch --multi_gpu` still starts one process per rank; cpu=True
    # makes accelerate join them over gloo instead of looking for CUDA.
    state = PartialState(cpu=not torch.cuda.is_available())
    shards = expand_shards(cfg.data.shards)
    mine = shards_for_rank(shards, state.process_index, state.num_processes)

    # Every refusal that needs no model comes first: loading a real target takes minutes.
    config = AutoConfig.from_pretrained(cfg.target.path)
    layer_ids = resolve_layer_ids(cfg, config)
    manifest = make_manifest(cfg, config, AutoTokenizer.from_pretrained(cfg.target.path), layer_ids)
    out = Location(cfg.out)
    out.check_writable()
    # One job per out (its ranks write there together), taken before anything is written there.
    hold.enter_context(held_by_main(lock_if_local(cfg.out, out.local, "out"), state.is_main_process,
                                    lambda v: broadcast_object_list([v])[0] if state.num_processes > 1 else v))
    writer = CacheWriter(cfg.out, manifest)  # refuses a cache of another target or config, and read-only output
    done = writer.committed()
    todo = [u for u in mine if output_shard_name(u) not in done]
    log.info("rank %d/%d: %d of %d input shards, %d already committed", state.process_index,
             state.num_processes, len(mine), len(shards), len(mine) - len(todo))

    export = state.is_main_process and not writer.target_files_written()
    start = time.perf_counter()
    incomplete = {}
    for url in mine:
        if output_shard_name(url) in done:  # a run killed between a commit and the removal of its answers
            remove_answers(writer, url)
    if todo and cfg.generation.engine != "transformers":
        # The engine first, alone on this rank's devices; the target is loaded once it has finished.
        regenerate_shards(cfg, writer, todo, state.process_index, state.local_process_index, torch.cuda.is_available(),
                          stop=lambda url: stop_here(stop, writer, "regeneration", None))
    if todo or export:
        if cfg.generation.capture == "engine":  # the weights stay with the engine
            target = load_structure(cfg.target.path, cfg.target.dtype, cfg.target.model_type)
            engine = hold.enter_context(EngineCapture(cfg, target, layer_ids, state.local_process_index,
                                                      torch.cuda.is_available())) if todo else None
        else:
            target = load_target(cfg.target.path, dtype=cfg.target.dtype,
                                 device=cfg.target.device or str(state.device), device_map=cfg.target.device_map,
                                 attn_implementation=cfg.target.attn_implementation, model_type=cfg.target.model_type)
            engine = None
        if export:
            export_target_files(writer, target)
        incomplete = extract_shards(cfg, target, writer, layer_ids, todo, state.process_index,
                                    stop=lambda url: stop_here(stop, writer, "capture", url), engine=engine)
    else:
        log.info("rank %d: nothing to do, the target is not loaded", state.process_index)
    state.wait_for_everyone()
    if state.num_processes > 1:
        incomplete = dict(gather_object(list(incomplete.items())))
    if not state.is_main_process:
        return {}
    return write_summary(writer, cfg.out, incomplete, time.perf_counter() - start)


def captured(target: Target, layer_ids: list[int], engine: EngineCapture | None):
    """Sequences -> (their sample or SkipSample, the agreement of an engine's answers with the target or None),
    captured by transformers one by one or by the engine a batch at once (which checks no agreement: the target
    that would is not loaded; the audit's --recompute judges such a cache)."""
    def one(seq):
        try:
            return guarded("capture_failed", capture, target, seq, layer_ids)
        except SkipSample as skip:
            return skip, None

    if engine is not None:
        return lambda seqs: [(x, None) for x in engine(seqs)]
    return lambda seqs: [one(s) for s in seqs]


def extract_shards(cfg: ExtractConfig, target: Target, writer: CacheWriter, layer_ids: list[int], urls: list[str],
                   rank: int, stop=lambda url: None, engine: EngineCapture | None = None) -> dict[str, str]:
    """Each input shard to one committed output shard; returns {input: why} of those not read to their end.
    `stop(url)` is asked after every batch and raises to stop there. `engine`: capture through it."""
    totals, incomplete = Counter(), {}
    capture_all = captured(target, layer_ids, engine)
    prompts = Prompts(target, cfg.generation.settings())
    bar = ShardProgress(writer, len(urls), rank, cfg.progress)
    start = time.perf_counter()

    def on_skip(key, skip: SkipSample):
        skips[skip.reason] += 1
        if cfg.strict:
            raise ValueError(f"sample {key}: {skip} (strict=true stops at the first bad sample; nothing of this "
                             "shard was committed)")
        log.warning("skipped %s: %s", key, skip)

    for url in urls:
        name = output_shard_name(url)
        shard = writer.shard(name)
        skips, turns = Counter(), Counter()
        answers = load_answers(writer, url) if cfg.generation.engine != "transformers" else None
        try:
            for batch in length_sorted_batches(conversations(url, cfg.data.format, on_skip),
                                               cfg.generation.batch_size, cfg.generation.sort_window):
                kept = 0
                answered = None if answers is None else answered_dialogs(answers, batch)
                results = build_sequences(prompts, batch, on_skip, answered)
                for result, (sample, checked) in zip(results, capture_all(results)):
                    if isinstance(sample, SkipSample):
                        on_skip(result.conv.key, sample)
                        if sample.reason == "non_finite_hidden":
                            totals["non_finite"] += 1
                            check_finite_share(totals)
                        continue
                    totals["captured"] += 1
                    turns.update(truncated=result.truncated_turns, dropped_after_truncation=result.dropped_turns,
                                 engine_token_ids=result.engine_ids,
                                 retokenization_mismatch=result.retokenized_differs)
                    if checked is not None:
                        count_agreement(turns, checked, result.conv.key)
                    with writing("output shard", writer.loc.where(SHARDS_DIR, name)):
                        shard.add(sample)
                    kept += 1
                    totals["captured_tokens"] += len(sample)
                    totals["generated_tokens"] += result.generated_tokens
                elapsed = time.perf_counter() - start
                bar.update(kept, sum(skips.values()), gen_tok_s=f"{totals['generated_tokens'] / elapsed:.0f}",
                           cap_tok_s=f"{totals['captured_tokens'] / elapsed:.0f}")
                stop(url)
        except IncompleteShard as e:
            if cfg.strict:
                raise ValueError(f"{e} (strict=true stops at the first broken input shard)") from e
            log.warning("%s; its output %s is not committed, a re-run retries it", e, name)
            writer.loc.remove_shard(name)
            incomplete[url] = f"{e.reason}: {e.detail}"
            bar.shard_done(sum(skips.values()))  # read, if not committed: it counts for the estimate
            continue
        with writing("output shard", writer.loc.where(SHARDS_DIR, name)):
            shard.commit({"source": url, "skipped": dict(skips), "turns": dict(turns)})
        remove_answers(writer, url)
        bar.shard_done(sum(skips.values()))
    bar.close()
    return incomplete


ENGINE_COUNTS = ("engine_answered", "engine_disagreements", "engine_disagreement_ties")
# A target whose states are mostly inf or NaN cannot run in this setting (its dtype, weights or kernels): skipping on
# would leave a cache of the few samples that happened to stay finite.
NON_FINITE_STOP = (8, 0.5)  # after at least this many samples, more than this share non-finite


def check_finite_share(totals: Counter) -> None:
    seen, bad = totals["captured"] + totals["non_finite"], totals["non_finite"]
    least, share = NON_FINITE_STOP
    if seen >= least and bad > share * seen:
        raise ValueError(f"{bad} of the {seen} samples captured so far had inf or NaN hidden states: the target "
                         "cannot run as configured (target.dtype, its weights, the kernels); nothing of the shard "
                         "being written was committed")


def count_agreement(turns: Counter, checked, key: str) -> None:
    """An engine-written last turn, counted in the marker; a token the target would not have chosen is logged with
    its logit gap."""
    turns.update(engine_answered=1, engine_disagreements=int(checked.disagrees),
                 engine_disagreement_ties=int(checked.tie))
    if checked.disagrees:
        log.warning("sample %s: the engine's answer token %d is not the target's greedy choice (the target prefers "
                    "its own by %.3g logits: %s)", key, checked.position, checked.gap,
                    "a tie at this dtype" if checked.tie else "beyond ties")


def write_summary(writer: CacheWriter, url: str, incomplete: dict[str, str], seconds: float) -> dict:
    """summary.json from every committed shard plus this run's incomplete input shards; printed as well."""
    report = audit(CacheReader(writer.loc.url))  # what the states hold, on a sample: training reads the verdict
    summary = writer.write_summary({"incomplete_input_shards": dict(sorted(incomplete.items())),
                                    "last_run_seconds": round(seconds, 2), "audit": report})
    shown = ("samples", "tokens", "supervised_tokens", "image_tokens", "shards", "uncommitted_shards",
             "duplicate_keys", "last_run_seconds")
    lines = [f"  {k}: {summary[k]}" for k in shown]
    lines += [f"  skipped.{k}: {v}" for k, v in summary["skipped"].items()] or ["  skipped: none"]
    lines += [f"  turns.{k}: {v}" for k, v in summary.get("turns", {}).items() if k in ENGINE_COUNTS]
    if summary["duplicate_keys"]:
        lines.append(f"  duplicate key examples: {', '.join(summary['duplicate_key_examples'])}")
    lines += [f"  NOT COMMITTED (re-run to retry) {k}: {v}" for k, v in summary["incomplete_input_shards"].items()]
    lines.append(f"  audit of {report['samples']} samples' hidden states: {report['verdict']}")
    print(f"extract summary for {url}\n" + "\n".join(lines), flush=True)
    return summary
