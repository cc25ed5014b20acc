"""A tiny Qwen3-VL or Qwen3.5 that has learned something: trained on the CPU on the scene task of
`tools/demo/scenes.py`.

Random-weight targets give degenerate greedy answers; this one answers held-out image prompts with the right
content, so a drafter trained on its regenerated answers can show real acceptance. The model and processor
come from `tools/fixtures/tiny_targets.py` (the real transformers classes, deepstack included); training is plain
PyTorch AdamW on the canonical answers, loss on assistant tokens only, fed by the processor's own outputs for
the chat-template rendering that extraction uses. Deterministic for a seed and thread count.

    python -m tools.demo.learned_target OUT [--steps 9000]
    python -m tools.demo.learned_target OUT --family qwen3_5 --text-layers 8 --rope-theta 20 --finetune-steps 3000

`--start-from FIRST` runs only the fine-tuning, from FIRST: a build of the same settings without it. Each run
writes OUT/model (save_pretrained of model and processor), OUT/accuracy.json, OUT/shards/train-*.tar and
OUT/shards/heldout-*.tar (reference answers; heldout is for evaluation only).
"""

import argparse
import hashlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import transformers
from tqdm import tqdm
from transformers import AutoModelForImageTextToText, AutoProcessor

from extract.formats import parse_sample
from tools.demo import scenes
from tools.fixtures import corpus, tiny_targets
from tools.fixtures.corpus import training_text
from tools.fixtures.tiny_targets import build_config, build_processor, build_tokenizer

HEADER = "<|im_start|>assistant\n"
FAMILIES = ("qwen3_vl", "qwen3_5")


@dataclass(frozen=True)
class Settings:
    family: str = "qwen3_vl"  # qwen3_5: Gated DeltaNet layers with full attention every 4th, partial rotary
    seed: int = 0
    train_samples: int = 20000
    steps: int = 9000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 30
    eval_samples: int = 200
    threads: int = 1
    # The language model's shape: width, depth, head size and theta. 32 is the smallest head size vLLM's CPU
    # attention kernel takes, so the engine serves the committed target as it is.
    text_hidden: int = 96
    text_layers: int = 6
    head_dim: int = 32
    rope_theta: float = 10_000.0
    # A second run from the first one's weights with a fresh AdamW (the same warmup and cosine shape, peak
    # finetune_lr, and the same seed, so it sees the batches in the first run's order again): the Qwen3.5 build
    # left the plateau late in its first run and learns its last tasks here.
    finetune_steps: int = 0
    finetune_lr: float = 3e-4

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"learned target family={self.family!r}; choose from {FAMILIES}")
        for name in ("train_samples", "steps", "batch_size", "eval_samples", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"learned target setting {name}={getattr(self, name)} must be at least 1")
        if self.head_dim % 16:
            raise ValueError(f"learned target head_dim={self.head_dim} must be a multiple of 16: its rotary pairs "
                             "split over the t, h and w axes in the real configs' 6:5:5 proportion")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"learned target setting warmup={self.warmup} must lie in [0, steps={self.steps})")
        if self.finetune_steps < 0:
            raise ValueError(f"learned target setting finetune_steps={self.finetune_steps} must be at least 0")
        if self.finetune_steps and self.warmup >= self.finetune_steps:
            raise ValueError(f"learned target setting warmup={self.warmup} must lie in "
                             f"[0, finetune_steps={self.finetune_steps})")

    def first_phase(self) -> dict:
        """The settings of the run that the fine-tuning starts from (the fine-tuning fields left out)."""
        return {k: v for k, v in asdict(self).items() if not k.startswith("finetune_")}

    def second_phase(self) -> "Settings":
        """What `train` runs for the fine-tuning: its steps and peak learning rate."""
        return replace(self, steps=self.finetune_steps, lr=self.finetune_lr, finetune_steps=0)

    def key(self) -> str:
        """Hash of the settings, the generator's source and the library versions: the build's cache key."""
        blob = json.dumps(asdict(self), sort_keys=True) + transformers.__version__ + torch.__version__
        for module in (scenes, sys.modules[__name__], tiny_targets, corpus):
            blob += Path(module.__file__).read_text()
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


def settings_of(family: str) -> Settings:
    """The committed build's settings: Qwen3.5 takes 8 layers, twice three linear-attention layers and a full one,
    and a fine-tuning run after the first."""
    if family == "qwen3_5":
        return Settings(family=family, text_layers=8, rope_theta=20.0, finetune_steps=3000)
    return Settings(family=family)


def chat(sample: scenes.Sample, answers: str = "canonical") -> list[dict]:
    """The sample's messages as extraction sees them: its own record parsed by the pipeline's parser."""
    return parse_sample(scenes.to_record(sample, answers), source="scenes").messages


def header_spans(ids: list[int], header: list[int], end_id: int) -> list[tuple[int, int]]:
    """Spans after each `header` occurrence up to and including the next `end_id` (unclosed spans dropped)."""
    spans, n, i = [], len(header), 0
    while i + n <= len(ids):
        if ids[i:i + n] == header:
            start = i + n
            end = next((j for j in range(start, len(ids)) if ids[j] == end_id), None)
            if end is None:
                break
            spans.append((start, end + 1))
            i = end + 1
        else:
            i += 1
    return spans


def build_processor_for(corpus_samples: list[scenes.Sample], family: str = "qwen3_vl"):
    text = [t[k] for s in corpus_samples for t in s.turns for k in ("question", "canonical", "reference")]
    tok = build_tokenizer(text + training_text())
    return build_processor(family, tok)


def encode(processor, batch: list[scenes.Sample]) -> list[dict]:
    """Per sample: processor outputs of the conversation with canonical answers, labels on assistant tokens.

    The processor runs on the whole batch (much faster than sample by sample) and its outputs are split back.
    """
    tok = processor.tokenizer
    header = tok.encode(HEADER, add_special_tokens=False)
    end_id = tok.convert_tokens_to_ids("<|im_end|>")
    texts = [processor.apply_chat_template(chat(s), tokenize=False) for s in batch]
    images = [img for s in batch for img in s.images]
    enc = processor(text=texts, images=images or None, padding=True, padding_side="right", return_tensors="pt")
    patches = iter(enc["pixel_values"].split(enc["image_grid_thw"].prod(-1).tolist()) if images else [])
    grids = iter(enc["image_grid_thw"].split(1) if images else [])
    items = []
    for row, (sample, n) in enumerate(zip(batch, enc["attention_mask"].sum(-1).tolist())):
        ids = enc["input_ids"][row, :n]
        labels = torch.full_like(ids, -100)
        for a, b in header_spans(ids.tolist(), header, end_id):
            labels[a:b] = ids[a:b]
        item = {"input_ids": ids, "mm_token_type_ids": enc["mm_token_type_ids"][row, :n], "labels": labels}
        if sample.images:
            item["pixel_values"] = torch.cat([next(patches) for _ in sample.images])
            item["image_grid_thw"] = torch.cat([next(grids) for _ in sample.images])
        items.append(item)
    return items


def collate(items: list[dict], pad_id: int) -> dict:
    """Right-padded batch; images concatenated in sample order, as the processor itself does."""
    T = max(len(it["input_ids"]) for it in items)

    def pad(key, value):
        out = torch.full((len(items), T), value, dtype=items[0][key].dtype)
        for i, it in enumerate(items):
            out[i, :len(it[key])] = it[key]
        return out

    batch = {"input_ids": pad("input_ids", pad_id), "mm_token_type_ids": pad("mm_token_type_ids", 0),
             "labels": pad("labels", -100)}
    batch["attention_mask"] = (torch.arange(T)[None] < torch.tensor([len(it["input_ids"]) for it in items])[:, None]
                               ).long()
    with_images = [it for it in items if "pixel_values" in it]
    if with_images:
        batch["pixel_values"] = torch.cat([it["pixel_values"] for it in with_images])
        batch["image_grid_thw"] = torch.cat([it["image_grid_thw"] for it in with_images])
    return batch


def mrope_section(head_dim: int) -> list[int]:
    """Rotary pairs per t, h, w axis in Qwen3-VL's proportion (its 128-dim heads use [24, 20, 20])."""
    pairs = head_dim // 2
    return [pairs - 2 * (pairs * 5 // 16)] + [pairs * 5 // 16] * 2


# Qwen3.5's published configs: a quarter of each 256-dim head rotates (32 pairs, M-RoPE sections [11, 11, 10]); the
# tiny heads' few pairs go to the time axis first.
QWEN35_ROTARY = 0.25


def text_shape(settings: Settings) -> dict:
    """The language-model fields `settings` choose, over the family's tiny defaults (4 heads, 2 kv heads; for
    Qwen3.5 also the linear-attention heads and full attention every 4th layer)."""
    rope = {"rope_type": "default", "rope_theta": settings.rope_theta,
            "mrope_section": mrope_section(settings.head_dim), "mrope_interleaved": True}
    if settings.family == "qwen3_5":
        pairs = int(settings.head_dim * QWEN35_ROTARY) // 2
        rope.update(partial_rotary_factor=QWEN35_ROTARY, mrope_section=[pairs - 2 * (pairs // 3)] + [pairs // 3] * 2)
    return dict(hidden_size=settings.text_hidden, intermediate_size=2 * settings.text_hidden,
                num_hidden_layers=settings.text_layers, head_dim=settings.head_dim, rope_parameters=rope)


def new_model(processor, settings: Settings):
    config = build_config(settings.family, processor.tokenizer, text_shape(settings))
    torch.manual_seed(settings.seed)
    model = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    return model


def batches(items: list[dict], batch_size: int, steps: int, seed: int):
    """`steps` batches; each draws 4 batches' worth of samples and groups them by length to cut padding."""
    rng = random.Random(seed)
    order: list[int] = []
    pending: list[list[int]] = []
    for _ in range(steps):
        if not pending:
            while len(order) < 4 * batch_size:
                more = list(range(len(items)))
                rng.shuffle(more)
                order += more
            pool, order = order[:4 * batch_size], order[4 * batch_size:]
            pool.sort(key=lambda i: len(items[i]["input_ids"]))
            pending = [pool[i:i + batch_size] for i in range(0, len(pool), batch_size)]
            rng.shuffle(pending)
        yield [items[i] for i in pending.pop()]


def train(model, items: list[dict], settings: Settings, pad_id: int, progress: bool = True) -> list[float]:
    """Plain AdamW with warmup and cosine decay; returns the loss of every step."""
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.01, betas=(0.9, 0.98))

    def lr_at(step):
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        done = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * done))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses = []
    bar = tqdm(batches(items, settings.batch_size, settings.steps, settings.seed), total=settings.steps,
               desc="train learned target", disable=not progress)
    for group in bar:
        loss = model(**collate(group, pad_id), use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}")
    model.eval()
    return losses


def turn_prompts(sample: scenes.Sample) -> list[tuple[str, list[dict], str]]:
    """Per turn: (task, the messages up to its question with canonical history, its canonical answer)."""
    messages = chat(sample)
    return [(turn["task"], messages[:2 * t + 1], turn["canonical"]) for t, turn in enumerate(sample.turns)]


@torch.no_grad()
def held_out_accuracy(model, processor, held_out: list[scenes.Sample], batch_size: int = 16,
             progress: bool = True) -> dict:
    """Greedy answers to every turn of the held-out samples (history: the canonical answers).

    Reports exact match per task and overall, and the share of the canonical answer's sentences that the
    greedy answer reproduces (a per-field score: each sentence carries one object, count or position).
    """
    tok = processor.tokenizer
    cases = [(s, *p) for s in held_out for p in turn_prompts(s)]
    results = []
    for i in tqdm(range(0, len(cases), batch_size), desc="evaluate held-out prompts", disable=not progress):
        chunk = cases[i:i + batch_size]
        texts = [processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
                 for _, _, msgs, _ in chunk]
        images = [img for s, *_ in chunk for img in s.images]
        enc = processor(text=texts, images=images or None, padding=True, padding_side="left", return_tensors="pt")
        longest = max(len(tok.encode(c)) for *_, c in chunk)
        out = model.generate(**enc, do_sample=False, max_new_tokens=longest + 8, temperature=None, top_p=None,
                             top_k=None)
        for (s, task, _, canon), row in zip(chunk, out[:, enc["input_ids"].shape[1]:].tolist()):
            # A thinking template's answer follows its (empty) reasoning block.
            answer = tok.decode(row, skip_special_tokens=True).split("</think>")[-1].strip()
            results.append((task, canon, answer, len(tok.encode(canon)) + 1))
    by_task: dict[str, list[bool]] = {}
    sentences_hit = sentences_all = 0
    for task, canon, answer, _ in results:
        by_task.setdefault(task, []).append(answer == canon)
        wanted = [c.strip() for c in canon.replace(". ", ".\n").split("\n")]
        got = {c.strip() for c in answer.replace(". ", ".\n").split("\n")}
        sentences_hit += sum(w in got for w in wanted)
        sentences_all += len(wanted)
    lengths = [n for *_, n in results]
    return {
        "turns": len(results),
        "exact_match": sum(ok for v in by_task.values() for ok in v) / len(results),
        "sentence_accuracy": sentences_hit / sentences_all,
        "exact_match_by_task": {t: round(sum(v) / len(v), 4) for t, v in sorted(by_task.items())},
        "turns_by_task": {t: len(v) for t, v in sorted(by_task.items())},
        "answer_tokens_mean": sum(lengths) / len(lengths),
        "answer_tokens_max": max(lengths),
        "examples": [{"task": t, "canonical": c, "greedy": a} for t, c, a, _ in results[:12]],
    }


def dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


class Refused(ValueError):
    """A build that cannot start as asked: what to change is in the message."""


def build(out: Path, settings: Settings = Settings(), progress: bool = True, start_from: Path | None = None) -> dict:
    """Train the learned target into `out/model`, write `out/accuracy.json`, return that report. The thread
    count is part of the settings (it changes the rounding, hence the model); the caller's is restored, and so
    is the global RNG that seeds the initialisation.

    `start_from`: an earlier build (its directory) whose settings are this one's first phase: only the
    fine-tuning runs, from its weights, with the result a run from scratch gets on the same machine and thread
    count. Its settings and tokenizer are checked; the generator's source and library versions are not (its key,
    which hashes them, is recorded in the report as `first_phase.key`).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        with torch.random.fork_rng(devices=[]):
            return _build(Path(out), settings, progress, None if start_from is None else Path(start_from))
    finally:
        torch.set_num_threads(threads)


def is_build(directory: Path) -> bool:
    """Whether `directory` holds a build: model/ and accuracy.json, as `build` writes them."""
    return (Path(directory) / "model").is_dir() and (Path(directory) / "accuracy.json").is_file()


def first_phase_report(start_from: Path, settings: Settings, out: Path) -> dict:
    """The report of the build at `start_from`, refused unless its settings are `settings`' first phase."""
    if not settings.finetune_steps:
        raise Refused(f"--start-from {start_from} needs --finetune-steps: there is nothing to run after it")
    if not is_build(start_from):
        raise Refused(f"--start-from {start_from}: not a learned target build (model/ and accuracy.json)")
    if start_from.resolve() == out.resolve():
        raise Refused(f"--start-from {start_from} is the output directory: the build would overwrite its start")
    report = json.loads((start_from / "accuracy.json").read_text())
    if report["settings"].get("finetune_steps") or "first_phase" in report:
        raise Refused(f"--start-from {start_from} is fine-tuned already: start from the build it was fine-tuned from")
    wanted = settings.first_phase()
    differ = sorted(k for k in wanted if report["settings"].get(k) != wanted[k])
    if differ:
        raise Refused(f"--start-from {start_from} was built with other settings: "
                      + ", ".join(f"{k}={report['settings'].get(k)!r} (here {wanted[k]!r})" for k in differ))
    return report


def _build(out: Path, settings: Settings, progress: bool, start_from: Path | None) -> dict:
    earlier = first_phase_report(start_from, settings, out) if start_from is not None else None
    if is_build(out):
        raise Refused(f"{out} holds a learned target build already: choose another directory or remove it")
    t0 = time.perf_counter()
    # Its own split: the shards' "train" prompts (the drafter's) are new to the target, as real data would be.
    train_set = scenes.samples("target", settings.train_samples, settings.seed)
    held_out = scenes.samples("heldout", settings.eval_samples, settings.seed)
    processor = build_processor_for(train_set, settings.family)
    if earlier is not None:
        theirs = AutoProcessor.from_pretrained(start_from / "model").tokenizer
        if theirs.get_vocab() != processor.tokenizer.get_vocab():
            raise Refused(f"--start-from {start_from}: its tokenizer is not the one these samples build")
    pad_id = processor.tokenizer.pad_token_id
    items = [it for i in tqdm(range(0, len(train_set), 64), desc="encode training samples", disable=not progress)
             for it in encode(processor, train_set[i:i + 64])]
    t_data = time.perf_counter() - t0
    cpu0 = time.process_time()
    if earlier is None:
        model = new_model(processor, settings)
        losses = train(model, items, settings, pad_id, progress)
    else:
        model = AutoModelForImageTextToText.from_pretrained(start_from / "model", dtype=torch.float32)
        losses = list(earlier["losses"])
    if settings.finetune_steps:
        losses += train(model, items, settings.second_phase(), pad_id, progress)
    losses = [round(x, 4) for x in losses]  # as the report keeps them, so a resumed build reports what one run does
    t_train = time.perf_counter() - t0 - t_data
    # CPU seconds over all threads: on a shared machine this, not the wall time, says what training costs.
    cpu_train = time.process_time() - cpu0
    model.save_pretrained(out / "model")
    processor.save_pretrained(out / "model")
    report = held_out_accuracy(model, processor, held_out, progress=progress)
    report.update(settings=asdict(settings), key=settings.key(), data_seconds=round(t_data, 1),
                  train_seconds=round(t_train, 1), train_cpu_seconds=round(cpu_train, 1),
                  eval_seconds=round(time.perf_counter() - t0 - t_data - t_train, 1),
                  final_loss=sum(losses[-20:]) / len(losses[-20:]), losses=losses,
                  train_tokens=sum(len(it["input_ids"]) for it in items),
                  checkpoint_mb=round(dir_mb(out / "model"), 2))
    if earlier is not None:
        # The seconds above are the fine-tuning's; the first phase's are its own build's.
        report["first_phase"] = {k: earlier[k] for k in ("key", "exact_match", "train_seconds", "final_loss")}
    (out / "accuracy.json").write_text(json.dumps(report, indent=1))
    return report


def ensure(work_dir: Path, settings: Settings = Settings(), progress: bool = True) -> Path:
    """The learned target for `settings` under `work_dir/learned-target-KEY`, built only if not there yet.

    KEY hashes the settings, the generator's source and the library versions, so a change to any of them
    builds afresh; a build writes to a temporary directory renamed at the end, so a killed one is never reused.
    Returns the directory holding `model/` and `accuracy.json`.
    """
    final = Path(work_dir) / f"learned-target-{settings.key()}"
    if (final / "accuracy.json").exists():
        return final
    partial = final.with_name(final.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    build(partial, settings, progress)
    partial.rename(final)
    return final


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-shard-samples", type=int, default=512, help="drafter-training prompts to write")
    parser.add_argument("--heldout-shard-samples", type=int, default=128, help="evaluation-only prompts to write")
    parser.add_argument("--start-from", type=Path, help="an earlier build of the first phase: only fine-tune it")
    defaults = Settings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args()
    try:
        settings = Settings(**{k: getattr(args, k) for k in asdict(defaults)})
    except ValueError as err:
        raise SystemExit(f"learned_target: {err}") from None
    try:
        report = build(args.out, settings, start_from=args.start_from)
    except Refused as err:
        raise SystemExit(f"learned_target: {err}") from None
    for split, n in (("train", args.train_shard_samples), ("heldout", args.heldout_shard_samples)):
        paths = scenes.write_task_shards(args.out / "shards", split, n, settings.seed)
        print(f"{split}: {len(paths)} shards in {args.out / 'shards'}")
    for ex in report["examples"]:
        print(f"[{ex['task']}]\n  want: {ex['canonical']}\n  got:  {ex['greedy']}")
    print(json.dumps({k: v for k, v in report.items() if k not in ("examples", "losses")}, indent=1))


if __name__ == "__main__":
    main()
