"""Reference speculative decoding: a drafter checkpoint with its Hugging Face target, checked against the
target's own greedy `generate`, on the prompts extraction would see.

    python -m tools.spec_decode --target PATH --drafter CKPT (--shards SPEC | --prompts FILE.json)
        [--vp CKPT --k 4] [--max-new-tokens N] [--max-prompts N] [--out DIR] [--dtype float32] [--device cpu]

A prompt is a conversation up to its last assistant turn, rendered as extraction renders that turn's prompt:
the target's chat template with the cache's system prompt and thinking switch, images included, earlier
assistant turns regenerated greedily first. `--prompts` takes a JSON list of samples in the shards' formats
(`messages` or LLaVA `conversations`), image files listed under `images` relative to the JSON file; a sample
may end with a user turn. Prompts run one at a time (no batching). Prints a table and writes spec_decode.json.
"""

import argparse
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from cache_schema import CacheError, Manifest
from extract.formats import SkipSample, parse_sample
from extract.prompts import GenerationSettings, Prompts
from extract.regenerate import generate, last_turn_prompt
from extract.sources import conversations, expand_shards
from extract.target import Target, config_fingerprint, load_target
from tools.speculative_decoder import SpeculativeDecoder
from train.checkpoint import check_weights, load_drafter, read_checkpoint
from train.config import served_position_source
from train.replay import GreedyDrafter, acceptance, shown

log = logging.getLogger("spec_decode")


def counting_skips(skips: Counter):
    """An `on_skip(key, skip)` that counts by reason into `skips` and logs the key."""
    def on_skip(key, skip: SkipSample):
        skips[skip.reason] += 1
        log.warning("skipped %s: %s", key, skip)
    return on_skip


def shard_conversations(spec: str, on_skip=None, fmt: str = "auto"):
    """Conversations of every shard; a bad sample's SkipSample goes to `on_skip` (default: counted nowhere,
    logged)."""
    on_skip = on_skip or counting_skips(Counter())
    for url in expand_shards(spec):
        yield from conversations(url, fmt, on_skip)


def file_conversations(path: Path):
    """Samples of a JSON prompts file, parsed by the shards' own parser (images read from their files)."""
    items = json.loads(Path(path).read_text())
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of samples")
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: sample {i} is not an object")
        item = dict(item)
        turns = "messages" if "messages" in item else "conversations"
        if isinstance(item.get(turns), list) and item[turns]:
            last = item[turns][-1]
            if not isinstance(last, dict):
                raise ValueError(f"{path}: sample {i}: each of {turns} must be an object, got {type(last).__name__}")
            if last.get("role", last.get("from")) in ("user", "human"):  # a bare prompt: the answer is to come
                item[turns] = [*item[turns], {"role": "assistant", "content": ""} if turns == "messages"
                               else {"from": "gpt", "value": ""}]
        names = item.get("images", [])
        names = [names] if isinstance(names, str) else names
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: sample {i}: images must be a file name or a list of file names")
        if not isinstance(item.get("key", i), (str, int)) or isinstance(item.get("key"), bool):
            raise ValueError(f"{path}: sample {i}: key must be a string or a number")
        record = {"__key__": str(item.get("key", i)), "json": json.dumps(item).encode()}
        for name in names:
            file = Path(path).parent / name
            if not file.exists():
                raise ValueError(f"{path}: sample {i} lists image {name}, but {file} does not exist")
            record[name] = file.read_bytes()
        try:
            yield parse_sample(record, source=str(path))
        except SkipSample as skip:
            raise ValueError(f"{path}: sample {i}: {skip}") from skip


def prompt_batches(renderer: Prompts, convs, max_prompts: int | None, on_skip):
    """(conversation, encoded last-turn prompt) pairs, at most `max_prompts`; a conversation extraction would skip
    goes to `on_skip`."""
    taken = 0
    for conv in convs:
        if max_prompts is not None and taken >= max_prompts:
            return
        try:
            batch = last_turn_prompt(renderer, conv)
        except SkipSample as skip:
            on_skip(conv.key, skip)
            continue
        taken += 1
        yield conv, batch


def check_target(target: Target, manifest: Manifest, where: str) -> None:
    want = {"model_type": manifest.target.model_type, "fingerprint": manifest.target.fingerprint}
    have = {"model_type": target.family, "fingerprint": config_fingerprint(target.model.config)}
    bad = {k: (want[k], v) for k, v in have.items() if want[k] != v}
    if bad:
        raise ValueError(f"{where} was trained on a cache of another target: " + ", ".join(
            f"{k} {a!r} in its cache, {b!r} loaded" for k, (a, b) in bad.items()))


def build(target: Target, drafter: Path, vp: Path | None, k: int, device) -> SpeculativeDecoder:
    head = target.head_tensors()
    ckpts = []
    for path in [drafter] + ([vp] if vp else []):
        ckpt = load_drafter(path, head["embed_tokens"], head["lm_head"])
        check_target(target, ckpt.manifest, str(path))
        ckpt.model.to(device)
        ckpts.append(ckpt)
    d = ckpts[0].drafter
    if vp and served_position_source(ckpts[1].drafter.position_source) != served_position_source(d.position_source):
        raise ValueError(f"--vp {vp}: position_source {ckpts[1].drafter.position_source!r} but the DFlash drafter "
                         f"uses {d.position_source!r}")
    drafting = [GreedyDrafter.from_checkpoint(c) for c in ckpts]
    return SpeculativeDecoder(target, drafting[0], list(d.target_layer_ids), served_position_source(d.position_source),
                      ckpts[0].manifest.storage.hidden_dtype, vp=drafting[1] if vp else None, k=k)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Decoding:
    """A drafter ready to decode the prompts its cache was extracted with: the checkpoints, the cache's
    generation settings, the answer limit, the loaded target, the decoder and the prompt renderer."""

    drafter: Path
    vp: Path | None
    settings: GenerationSettings
    limit: int
    dtype: str
    target: Target
    spec: SpeculativeDecoder
    renderer: Prompts


def prepare(target_path: str, drafter: Path, vp: Path | None = None, k: int = 4, max_new_tokens: int | None = None,
            dtype: str | None = None, device: str | None = None) -> Decoding:
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    # A run directory stands for its latest checkpoint, as in train.evaluate and train.export.
    # Both drafters' files are checked first: loading a real target takes minutes.
    info = check_weights(read_checkpoint(drafter))
    vp = check_weights(read_checkpoint(vp)).path if vp is not None else None
    generation = info.manifest.generation
    # The prompts the drafter was trained on: the settings its cache was extracted with.
    settings = GenerationSettings.from_manifest(generation)
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens={max_new_tokens} must be >= 1")
    settings.check()
    dtype = dtype or generation.get("target_dtype", "bfloat16")
    target = load_target(target_path, dtype=dtype, device=device)
    spec = build(target, Path(info.path), Path(vp) if vp else None, k, device)
    # Earlier turns are regenerated under the cache's own limit, as extraction did; the override only bounds
    # the answer decoded here.
    return Decoding(Path(info.path), vp, settings, max_new_tokens or settings.max_new_tokens, dtype, target, spec,
                    Prompts(target, settings))


def source_conversations(shards: str | None, prompts: Path | None, on_skip):
    """The conversations of exactly one of --shards and --prompts."""
    if (shards is None) == (prompts is None):
        raise ValueError("give exactly one of --shards and --prompts")
    return shard_conversations(shards, on_skip) if shards else file_conversations(prompts)


def run(target_path: str, drafter: Path, shards: str | None = None, prompts: Path | None = None,
        vp: Path | None = None, k: int = 4, max_new_tokens: int | None = None, max_prompts: int | None = None,
        out: Path | None = None, dtype: str | None = None, device: str | None = None, progress: bool = True) -> dict:
    rows, skipped = [], Counter()
    on_skip = counting_skips(skipped)
    convs = source_conversations(shards, prompts, on_skip)  # lazy: a wrong pair is refused before any loading
    d = prepare(target_path, drafter, vp, k, max_new_tokens, dtype, device)
    target, spec, limit, device = d.target, d.spec, d.limit, d.target.device
    bar = tqdm(total=max_prompts, unit="prompt", desc="spec_decode", disable=not progress)
    for conv, batch in prompt_batches(d.renderer, convs, max_prompts, on_skip):
        _sync(device)
        t0 = time.perf_counter()
        (reference,), _ = generate(target, batch, limit)
        _sync(device)
        ref_seconds = time.perf_counter() - t0
        result = spec.decode(batch, limit)
        rows.append({"key": conv.key, "images": len(conv.images), "prompt_tokens": batch["input_ids"].shape[1],
                     "generated": len(result.tokens), "lossless": result.tokens == reference,
                     "cycles": len(result.accepted), "accepted": result.accepted, "committed": result.committed,
                     "target_forwards": result.forwards, "spec_seconds": result.seconds,
                     "generate_seconds": ref_seconds,
                     **({} if result.tokens == reference else {"tokens": result.tokens, "reference": reference})})
        bar.update(1)
    bar.close()
    if not rows:
        raise ValueError(f"no prompt to decode in {shards or prompts} (skipped: {dict(skipped) or 'none'})")
    report = decode_figures(rows, spec.dflash.block)
    report.update({"target": target_path, "drafter": str(d.drafter), "vp": str(d.vp) if d.vp else None,
                   "k": k if vp else None, "batch": "one prompt at a time",
                   "d2sd_verification": "branches one after another" if vp else None,
                   "max_new_tokens": limit, "skipped": dict(skipped), "prompts": rows})
    print(table(report))
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / "spec_decode.json").write_text(json.dumps(report, indent=2))
    return report


def decode_figures(rows: list[dict], block: int) -> dict:
    """Pooled figures (train.replay.acceptance: tau, P(slot k accepted), histogram of a), per group, tokens/s."""
    a = np.array([x for r in rows for x in r["accepted"]], dtype=np.int64)
    committed = sum(sum(r["committed"]) for r in rows)
    tokens = sum(r["generated"] for r in rows)
    spec_s, ref_s = sum(r["spec_seconds"] for r in rows), sum(r["generate_seconds"] for r in rows)
    groups = {"all": rows, "images": [r for r in rows if r["images"]],
              "text_only": [r for r in rows if not r["images"]]}
    return {"lossless": all(r["lossless"] for r in rows), "samples": len(rows),
            "lossless_samples": sum(r["lossless"] for r in rows), **acceptance(a, committed, block),
            "tau_by_group": {g: (sum(sum(r["committed"]) for r in rs) / n if (n := sum(r["cycles"] for r in rs))
                                 else None) for g, rs in groups.items()},
            "target_forwards_per_cycle": sum(r["target_forwards"] for r in rows) / a.size if a.size else None,
            "generated_tokens": tokens, "spec_tokens_per_s": tokens / spec_s if spec_s else None,
            "generate_tokens_per_s": tokens / ref_s if ref_s else None}


def table(report: dict) -> str:
    lines = [f"speculative decoding of {report['samples']} prompts (one at a time), block "
             f"{len(report['accept_per_slot']) + 1}" + (f", D2SD k={report['k']}" if report["vp"] else ""),
             f"  lossless            {'yes' if report['lossless'] else 'NO'} "
             f"({report['lossless_samples']}/{report['samples']} identical to generate)",
             f"  tau                 {shown(report['tau'])}  (" + ", ".join(
                 f"{g} {t:.3f}" for g, t in report["tau_by_group"].items() if t is not None) + ")",
             f"  cycles              {report['cycles']}  (target forwards per cycle "
             f"{shown(report['target_forwards_per_cycle'], '.2f')})",
             "  accepted per slot   " + " ".join(shown(p, ".2f") for p in report["accept_per_slot"]),
             "  histogram of a      " + " ".join(map(str, report["accepted_hist"])),
             f"  tokens/s            speculative {shown(report['spec_tokens_per_s'], '.1f')}, generate "
             f"{shown(report['generate_tokens_per_s'], '.1f')}"]
    if report["skipped"]:
        lines.append("  skipped             " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    return "\n".join(lines)


def prompt_arguments(p: argparse.ArgumentParser, drafter_help: str) -> None:
    """--target, --drafter and the prompt source, as every command that decodes a drafter's prompts takes them."""
    p.add_argument("--target", required=True, help="the target model directory or hub id")
    p.add_argument("--drafter", required=True, type=Path, help=drafter_help)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="webdataset shards (brace pattern or comma-separated list)")
    src.add_argument("--prompts", type=Path, help="a JSON list of samples (see tools.spec_decode)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt_arguments(p, "a DFlash drafter checkpoint, run directory or RUN/best")
    p.add_argument("--vp", type=Path, help="a VP drafter checkpoint or run directory: D2SD branching")
    p.add_argument("--k", type=int, default=4, help="D2SD branches per cycle")
    p.add_argument("--max-new-tokens", type=int, help="default: the cache's generation.max_new_tokens")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--out", type=Path, help="write spec_decode.json here")
    p.add_argument("--dtype", help="the target's dtype (default: the one extraction used)")
    p.add_argument("--device")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args.target, args.drafter, args.shards, args.prompts, args.vp, args.k, args.max_new_tokens,
                 args.max_prompts, args.out, args.dtype, args.device)
    if not report["lossless"]:
        raise SystemExit("speculative decoding differs from generate on "
                         f"{report['samples'] - report['lossless_samples']} prompts (see spec_decode.json)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, CacheError) as e:  # a user mistake or a bad cache: one line, not a traceback
        raise SystemExit(f"tools.spec_decode: {e}") from None
