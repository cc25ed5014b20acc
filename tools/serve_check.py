"""Acceptance where it is served: a serving engine runs the drafter on the prompts our figures come from, and
the two are compared side by side, a gap larger than ties explain named with its likely cause.

    python -m tools.serve_check --target PATH --drafter (RUN | CKPT | EXPORT) (--shards SPEC | --prompts FILE.json)
        [--engine vllm] [--engine-python PATH] [--max-new-tokens N] [--max-prompts N] [--out DIR] [--dtype D]

The prompts are the ones `tools.spec_decode` builds (the cache's chat template, system prompt and thinking
switch, images, earlier turns regenerated). The engine runs in its own interpreter, fed token ids and image files:
greedy without speculation, then with the drafter's export (the one given, or a `speculators` export written from
the checkpoint). Our side decodes every prompt with transformers' `generate` and with the reference speculative
decoder, at the position source the drafter was trained with and as the engine's model runner feeds it (its
positions, and on vLLM's V1 runner its drafter cache of one slot per position).
Prints a table and writes serve_check.json and serve_check.png (acceptance per draft position) to --out.

Two definitions of acceptance are printed for both sides: the engine's, 1 + accepted / drafts, which counts draft
tokens matched past the end of an answer, and ours, tau = committed tokens / cycles.
"""

import argparse
import json
import logging
import tempfile
from collections import Counter
from dataclasses import replace
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from cache_schema import CacheError  # noqa: E402
from extract.prompts import images_in  # noqa: E402
from extract.capture import TIE_ULPS, tie_gap  # noqa: E402
from extract.regenerate import extended, generate  # noqa: E402
from engines import ENGINES, MEMORY_FRACTION, RUNNER_POSITIONS, RUNNER_SHARED_SLOTS, engine_prompt  # noqa: E402
from train.replay import shown  # noqa: E402
from tools.spec_decode import (counting_skips, prepare, prompt_arguments, prompt_batches,  # noqa: E402
                               source_conversations)
from cache_schema.codecs import DTYPES  # noqa: E402
from train.export import export, is_our_export  # noqa: E402
from train.export_formats import FORMATS  # noqa: E402
from train.checkpoint import read_checkpoint  # noqa: E402

log = logging.getLogger("serve_check")

# Both sides compute target and drafter with other kernels, so a near-tie can flip one draft token and change one
# cycle's count: counts within this share of the drafts (at least one) are ties, not a gap. Measured with vLLM
# 0.32's CPU build (tests/test_vllm.py, docs/vllm_cpu_defects.md): "ours, as served" equals the engine's counts on
# every configuration tried; 3% covers what the V1 runner's shared slots change on the learned target's 4-token
# images (2.3%), which the offline replay of a cache (the as-trained figure) does not model.
TIE_SHARE = 0.03


def resolve_drafter(path: Path) -> tuple[Path, Path | None]:
    """(the drafter's checkpoint or run directory, its export or None). An export names its source checkpoint,
    which holds the cache's generation settings and the weights our side decodes with."""
    path = Path(path)
    fmt = next((f for f in FORMATS if is_our_export(path, f)), None)
    if fmt is None:
        return path, None
    source = json.loads((path / "config.json").read_text())["dflash_offline"].get("source_checkpoint")
    if not source or not Path(source).is_dir():
        raise ValueError(f"export {path} names source checkpoint {source!r}, which is not here: pass the run "
                         "directory or checkpoint it was exported from")
    return Path(source), path


def our_figures(decoded: list, block: int, seconds: float) -> dict:
    """Acceptance of our decoder's cycles in both definitions, per draft position, and tokens/s."""
    matched = [a for d in decoded for a in d.matched]
    cycles, tokens = len(matched), sum(len(d.tokens) for d in decoded)
    committed = sum(sum(d.committed) for d in decoded)
    return {"drafts": cycles, "accepted": sum(matched),
            "acceptance_length": 1 + sum(matched) / cycles if cycles else None,
            "tau": committed / cycles if cycles else None,
            "accept_per_position": [sum(a >= k for a in matched) / cycles if cycles else None for k in range(1, block)],
            "tokens_per_s": tokens / seconds if seconds else None,
            "overwritten_context": sum(d.overwritten for d in decoded)}


def engine_figures(run: dict) -> dict:
    """The same figures from the engine's own counters (tau: its output tokens after the first, per draft)."""
    sd, outputs = run["spec_decode"], run["outputs"]
    drafts, accepted = sd.get("num_drafts", 0), sd.get("num_accepted_tokens", 0)
    tokens = sum(map(len, outputs))
    return {"drafts": drafts, "accepted": accepted, "acceptance_length": 1 + accepted / drafts if drafts else None,
            "tau": (tokens - len(outputs)) / drafts if drafts else None,
            "accept_per_position": [n / drafts if drafts else None for n in sd.get("num_accepted_tokens_per_pos", [])],
            "tokens_per_s": tokens / run["seconds"] if run["seconds"] else None}


def agrees(a: dict, b: dict) -> bool:
    """Whether two sides' draft and accepted counts differ by no more than ties explain."""
    slack = max(1, round(TIE_SHARE * max(a["drafts"], b["drafts"])))
    return abs(a["drafts"] - b["drafts"]) <= slack and abs(a["accepted"] - b["accepted"]) <= slack


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.no_grad()
def parting(target, batch: dict, a: list[int], b: list[int]) -> dict | None:
    """Where two answers to one prompt part, None if they do not: the answer token, transformers' logit gap between
    their two tokens after the common prefix, and whether that gap is a tie at the target's dtype (the capture's
    rule, extract/capture.py): another kernel may resolve a tie either way, so such a parting is not a loss."""
    if a == b:
        return None
    j = first_difference(a, b)
    if j == min(len(a), len(b)):  # one answer stops where the other goes on: not a choice between two tokens
        return {"at": j, "gap": None, "tie": False}
    inputs = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in extended(batch, a[:j]).items()}
    logits = target.model(**inputs, logits_to_keep=1).logits[0, -1].float()
    if target.suppressed_ids:
        logits[target.suppressed_ids] = float("-inf")
    chosen, other = (a[j], b[j]) if logits[a[j]] >= logits[b[j]] else (b[j], a[j])
    gap, tie = tie_gap(logits, chosen, other, target.model.dtype)
    return {"at": j, "gap": round(gap, 4), "tie": tie}


def diagnose(report: dict) -> list[dict]:
    """The likely causes of a gap between the engine's acceptance and our replay, most basic first, each
    {"cause": a short name, "detail": what was measured and what to do}."""
    causes = []

    def cause(name: str, detail: str) -> None:
        causes.append({"cause": name, "detail": detail})

    ours, as_served, engine = report["ours"], report["ours_as_served"], report["engine"]
    differs = beyond_ties(report, "engine_greedy_vs_transformers")
    if differs:
        p = differs[0]
        cause("prompts or target differ",
              f"the engine's own greedy answers differ from transformers' beyond ties on {len(differs)} of "
              f"{len(report['prompts'])} prompts (first: {p['key']} at answer token "
              f"{p['partings']['engine_greedy_vs_transformers']['at']}): it is given or computes other contexts "
              "than the cache holds (chat template, system prompt, thinking switch, dtype, kernels), so the drafter "
              "is fed states it was not trained on")
    broken = [p["key"] for p in beyond_ties(report, "engine_vs_its_greedy")]
    if broken:
        cause("engine verification",
              f"speculative decoding changed the engine's output beyond ties on {len(broken)} prompts ({broken[0]} "
              "first): the engine's verification is not lossless, a defect of the engine, not the drafter")
    trained, fed = report["position_source"], report["runner_position_source"]
    runner = f"{report['engine_name']}'s {report['runner']} runner"
    if not agrees(ours, as_served):
        measured = (f"fed as the engine feeds it our replay gives acceptance length "
                    f"{as_served['acceptance_length']:.3f}, as trained {ours['acceptance_length']:.3f}")
        images, named = any(p["images"] for p in report["prompts"]), len(causes)  # positions differ on images only
        if images and report["trained_position_source"] == "mixed":
            cause("position source",
                  f"{runner} feeds the drafter {fed} positions; it was trained with both (mixed) and accepts "
                  f"differently under them (image prompts only); {measured}")
        elif images and trained != fed:
            cause("position source",
                  f"{runner} feeds the drafter {fed} positions, it was trained with {trained} (they differ on image "
                  f"prompts only); {measured}; serve with a runner that feeds what it was trained with, or retrain "
                  f"with drafter.position_source={fed}")
        if as_served["overwritten_context"]:
            cause("shared slots",
                  f"{runner} places the drafter's context in one cache slot per position, so the tokens of an image "
                  f"share one: {as_served['overwritten_context']} context tokens were overwritten and their slots "
                  f"read empty (docs/vllm_cpu_defects.md); {measured}; serve with a runner that gives every token "
                  "its slot (vLLM's V2)")
        if len(causes) == named:
            cause("cache rounding",
                  f"the engine feeds the drafter the target's hidden states unrounded, training saw them rounded to "
                  f"the cache's {report['hidden_dtype']}; {measured}")
    if not agrees(engine, as_served):
        layers = report["drafter_layers"]
        if report["engine_name"] == "vllm" and report["engine_device"] == "cpu" and layers > 1:
            cause("vLLM CPU rms_norm defect",
                  f"vLLM's CPU rms_norm applies the first layer's k_norm weight to all {layers} drafter layers "
                  "(docs/vllm_cpu_defects.md): layers 1.. are computed otherwise than trained; a one-layer drafter is "
                  "not affected")
        else:
            cause("unexplained",
                  f"the engine accepts {engine['accepted']} of {engine['drafts']} drafts, our replay as served "
                  f"{as_served['accepted']} of {as_served['drafts']} (per request: prompts[].drafts in "
                  "serve_check.json); compare the export's target_layer_ids with the cache's, the target revision "
                  "the engine loads, and the engine version")
    return causes


# The answers compared for losslessness: (the first's, the second's) of each prompt's row.
PAIRS = {"engine_vs_its_greedy": ("engine_speculative", "engine_greedy"),
         "engine_vs_transformers": ("engine_speculative", "reference"),
         "engine_greedy_vs_transformers": ("engine_greedy", "reference"),
         "ours_vs_transformers": ("ours", "reference")}


def beyond_ties(report: dict, pair: str) -> list[dict]:
    """The prompts whose two answers of `pair` part where transformers' logits do not tie."""
    return [p for p in report["prompts"] if pair in p["partings"] and not p["partings"][pair]["tie"]]


def lossless(report: dict, pair: str) -> bool:
    """Whether every prompt's two answers of `pair` are equal, or part only at a tie of the target's dtype."""
    return report["lossless"][pair] + report["ties"][pair] == report["samples"]


# The engine settings the check chooses for a target, reported beside the figures.
ENGINE_SETTINGS = ("dtype", "enable_prefix_caching")


def hybrid_settings(target) -> dict:
    """What a target with recurrent-state layers (Qwen3.5's Gated DeltaNet) needs of vLLM 0.32 to be served with a
    drafter: prefix caching off, without which its speculative decoding fails (docs/vllm_cpu_defects.md)."""
    return {"enable_prefix_caching": False} if target.traits.recurrent_state else {}


def run(target_path: str, drafter: Path, shards: str | None = None, prompts: Path | None = None,
        engine: str = "vllm", engine_python: Path | None = None, max_new_tokens: int | None = None,
        max_prompts: int | None = None, out: Path | None = None, dtype: str | None = None,
        memory_fraction: float | None = None, device: str | None = None, progress: bool = True) -> dict:
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine!r}; choose one of {', '.join(ENGINES)}")
    skipped = Counter()
    on_skip = counting_skips(skipped)
    convs = source_conversations(shards, prompts, on_skip)
    checkpoint, export_dir = resolve_drafter(drafter)
    if read_checkpoint(checkpoint).drafter.architecture == "dflash2":
        raise ValueError(
            f"{drafter} is a DFlash2 drafter: vLLM serves its convolutions and selector only with its V2 model runner, "
            "which needs Triton (a GPU build); the CPU build's V1 runner refuses 'DFlash candidate-head drafts', and "
            "serving it as a DFlash drafter would measure another model. Judge it offline (train.evaluate) and "
            "online (tools.spec_decode) instead")
    d = prepare(target_path, checkpoint, max_new_tokens=max_new_tokens, dtype=dtype, device=device)
    target, limit, block = d.target, d.limit, d.spec.dflash.block
    items = list(prompt_batches(d.renderer, convs, max_prompts, on_skip))
    if not items:
        raise ValueError(f"no prompt to decode in {shards or prompts} (skipped: {dict(skipped) or 'none'})")
    with tempfile.TemporaryDirectory(prefix="serve-check-") as tmp:
        if export_dir is None:
            export_dir = export(d.drafter, "speculators", Path(tmp) / "export",
                            dtype=d.dtype if d.dtype in DTYPES else "bfloat16")
        image_id = target.special_tokens.get("image_token_id")
        shown = [images_in(c.messages[:c.assistant_turns[-1]], c) for c, _ in items]  # each prompt's images
        fraction = memory_fraction or MEMORY_FRACTION["cuda" if torch.cuda.is_available() else "cpu"]
        request = {"model": target_path, "dtype": d.dtype, "memory_fraction": fraction,
                   "max_tokens": limit, "stop_token_ids": target.eos_ids,
                   "banned_token_ids": target.suppressed_ids,
                   "max_model_len": max(b["input_ids"].shape[1] for _, b in items) + limit + block + 16,
                   "prompts": [engine_prompt(b["input_ids"][0].tolist(), shown[i], image_id, Path(tmp) / f"prompt-{i}")
                               for i, (_, b) in enumerate(items)],
                   **hybrid_settings(target),
                   "runs": [{"name": "greedy"},
                            {"name": "speculative", "speculative_config": {
                                "method": "dflash", "model": str(export_dir), "num_speculative_tokens": block - 1}}]}
        print(f"serve_check: {engine} serves {len(items)} prompts, greedy then speculative (its own interpreter; "
              "its start-up takes a while)", flush=True)
        result = ENGINES[engine](request, engine_python)
    runner = result["runner"]
    fed = RUNNER_POSITIONS[engine, runner]
    # Ours as trained (the offline replay's inputs: hidden states rounded as the cache stores them, the trained
    # positions) and ours as the engine feeds the drafter (unrounded states, the runner's positions and slots).
    sides = {"ours": d.spec, "ours_as_served": replace(d.spec, position_source=fed, engine_precision=True,
                                                       shared_slots=RUNNER_SHARED_SLOTS[engine, runner])}
    decoded = {name: [] for name in sides}
    seconds = dict.fromkeys(sides, 0.0)
    rows = []
    for i, (conv, batch) in enumerate(tqdm(items, desc="ours: generate + speculative", unit="prompt",
                                           disable=not progress)):
        (reference,), _ = generate(target, batch, limit)
        for name, spec in sides.items():
            decoded[name].append(spec.decode(batch, limit))
            seconds[name] += decoded[name][-1].seconds
        row = {"key": conv.key, "images": len(shown[i]), "reference": reference, "ours": decoded["ours"][-1].tokens,
               "engine_greedy": result["runs"]["greedy"]["outputs"][i],
               "engine_speculative": result["runs"]["speculative"]["outputs"][i]}
        row["partings"] = {pair: parting(target, batch, row[a], row[b]) for pair, (a, b) in PAIRS.items()
                           if row[a] != row[b]}
        # Per request, what the engine's counters (summed over requests) cannot show: our replay's cycles.
        row["drafts"] = {name: {"drafts": len(d[-1].matched), "accepted": sum(d[-1].matched)}
                         for name, d in decoded.items()}
        rows.append(row)
    figures = {name: our_figures(decoded[name], block, seconds[name]) for name in sides}
    report = {"target": target_path, "drafter": str(d.drafter), "export": str(export_dir) if drafter != checkpoint
              else "speculators, written for this check", "engine_name": engine, "engine_version": result["version"],
              "engine_device": result["device"], "runner": runner, "runner_position_source": fed,
              "runner_shared_slots": RUNNER_SHARED_SLOTS[engine, runner],
              "position_source": d.spec.position_source, "hidden_dtype": d.spec.hidden_dtype, "dtype": d.dtype,
              "engine_settings": {k: request[k] for k in ENGINE_SETTINGS if k in request},
              "trained_position_source": read_checkpoint(d.drafter).drafter.position_source,
              "drafter_layers": len(d.spec.dflash.model.layers),
              "block": block, "max_new_tokens": limit, "samples": len(rows), "skipped": dict(skipped),
              "tie_share": TIE_SHARE,
              "engine": engine_figures(result["runs"]["speculative"]),
              "engine_greedy_tokens_per_s": sum(map(len, result["runs"]["greedy"]["outputs"]))
              / result["runs"]["greedy"]["seconds"],
              **figures,
              "lossless": {pair: sum(pair not in r["partings"] for r in rows) for pair in PAIRS},
              "ties": {pair: sum(pair in r["partings"] and r["partings"][pair]["tie"] for r in rows) for pair in PAIRS},
              "prompts": rows}
    report["agrees"] = agrees(report["engine"], report["ours"])
    report["causes"] = [] if report["agrees"] else diagnose(report)
    print(table(report))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "serve_check.json").write_text(json.dumps(report, indent=2))
        plot(report, out / "serve_check.png")
    return report


def served(report: dict) -> str:
    """What the engine's runner feeds the drafter, in words."""
    slots = ", one slot per position" if report["runner_shared_slots"] else ""
    return f"{report['runner_position_source']} positions{slots}"


def table(report: dict) -> str:
    n = report["samples"]

    def equal(pair: str) -> str:
        ties = report["ties"][pair]
        return f"{report['lossless'][pair]}/{n}" + (f" + {ties} ties" if ties else "")

    cols = [("engine", report["engine"]), ("ours, as trained", report["ours"]),
            ("ours, as served", report["ours_as_served"])]
    lines = [f"serve check: {report['engine_name']} {report['engine_version']} ({report['engine_device']}, "
             f"{report['runner']} runner: feeds {served(report)}), {n} prompts, block {report['block']}, drafter "
             f"trained with {report['position_source']} positions and {report['hidden_dtype']} states (served: "
             "unrounded)"]
    per_position = [" ".join(shown(p, ".2f") for p in f["accept_per_position"]) for _, f in cols]
    w = max(22, *(len(x) + 2 for x in per_position))
    lines.append(f"  {'':28}" + "".join(f"{name:>{w}}" for name, _ in cols))
    for label, key, fmt in (("acceptance length 1+acc/drafts", "acceptance_length", ".3f"),
                            ("tau (committed per cycle)", "tau", ".3f"), ("drafts", "drafts", "d"),
                            ("accepted draft tokens", "accepted", "d"),
                            ("tokens/s speculative", "tokens_per_s", ".1f")):
        lines.append(f"  {label:28}" + "".join(f"{shown(f[key], fmt):>{w}}" for _, f in cols))
    lines.append(f"  {'accepted per position':28}" + "".join(f"{x:>{w}}" for x in per_position))
    lines += [f"  engine greedy tokens/s      {report['engine_greedy_tokens_per_s']:.1f}",
              f"  lossless                    engine speculative = its greedy {equal('engine_vs_its_greedy')}, "
              f"= transformers {equal('engine_vs_transformers')}; engine greedy = transformers "
              f"{equal('engine_greedy_vs_transformers')}; ours = transformers {equal('ours_vs_transformers')}"
              + (f" (+ ties: the answers part where transformers' {report['dtype']} logits differ by less than "
                 f"{TIE_ULPS} units of its precision)" if any(report["ties"].values()) else "")]
    if report["agrees"]:
        lines.append(f"  verdict                     the engine accepts what our replay predicts (within ties: "
                     f"{report['tie_share']:.0%} of the drafts)")
    else:
        lines.append("  verdict                     GAP: the engine accepts otherwise than our replay predicts; "
                     "likely causes:")
        lines += [f"    - {c['cause']}: {c['detail']}" for c in report["causes"]]
    if report["skipped"]:
        lines.append("  skipped                     " + ", ".join(f"{k} {v}" for k, v in report["skipped"].items()))
    return "\n".join(lines)


def plot(report: dict, path: Path) -> None:
    """Acceptance per draft position: the engine beside our replay as trained and as served."""
    sides = [("engine", report["engine"]),
             (f"ours as trained ({report['position_source']}, {report['hidden_dtype']} states)", report["ours"]),
             (f"ours as served ({served(report)}, unrounded)", report["ours_as_served"])]
    k = range(1, report["block"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(sides)
    for j, (label, f) in enumerate(sides):
        ax.bar([x + (j - 1) * width for x in k], [p or 0 for p in f["accept_per_position"]], width,
               label=f"{label}: {shown(f['acceptance_length'])}")
    ax.set_xlabel("draft position")
    ax.set_ylabel("P(accepted)")
    ax.set_xticks(list(k))
    ax.set_ylim(0, 1)
    ax.set_title(f"{report['engine_name']} {report['runner']} runner vs our replay, {report['samples']} prompts")
    ax.legend(title="acceptance length 1 + accepted/drafts")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    prompt_arguments(p, "a run directory, a checkpoint, RUN/best, or an export")
    p.add_argument("--engine", default="vllm", choices=sorted(ENGINES))
    p.add_argument("--engine-python", type=Path,
                   help="the engine's interpreter (default: $DFLASH_VLLM_PYTHON or .venv-vllm from make setup-vllm)")
    p.add_argument("--max-new-tokens", type=int, help="default: the cache's generation.max_new_tokens")
    p.add_argument("--max-prompts", type=int)
    p.add_argument("--out", type=Path, default=Path("serve_check"), help="where serve_check.json and .png go")
    p.add_argument("--dtype", help="the target's dtype on both sides (default: the one extraction used)")
    p.add_argument("--engine-memory-fraction", type=float,
                   help="vLLM's gpu_memory_utilization: on a GPU the share of its memory for weights and KV cache, on "
                        f"the CPU build the share of RAM for the KV cache (default: {MEMORY_FRACTION['cuda']} on a GPU, "
                        f"{MEMORY_FRACTION['cpu']} on a CPU)")
    p.add_argument("--device", help="our side's device (default: cuda if available)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = run(args.target, args.drafter, args.shards, args.prompts, args.engine, args.engine_python,
                 args.max_new_tokens, args.max_prompts, args.out, args.dtype, args.engine_memory_fraction,
                 args.device)
    if not lossless(report, "engine_vs_its_greedy"):
        raise SystemExit("the engine's speculative output differs from its greedy output beyond ties (see "
                         "serve_check.json)")


if __name__ == "__main__":
    try:
        main()
    except (ValueError, CacheError, RuntimeError) as e:  # a user mistake, a bad cache, an engine that failed
        raise SystemExit(f"tools.serve_check: {e}") from None
