"""Regeneration by a serving engine (`generation.engine=vllm`): every assistant turn of this rank's shards is
answered by one long-lived engine before the target is loaded; transformers then captures the hidden states over
exactly those answers.

The engine is fed what in-process regeneration feeds `generate`: the prompt rendered by extract/prompts.py (chat
template, system prompt, thinking switch, earlier turns as the engine answered them) as token ids, with the images
as lossless PNG files; greedy, `max_new_tokens`, the target's end-of-turn ids, its suppressed tokens. A
conversation's turns go turn by turn, batched across the conversations of a window. Its answers enter extraction
as the regenerated ids of each turn, the same path in-process answers take, so an engine that answers as
`generate` does gives the same cache byte for byte.

Each window of a shard (`generation.engine_window` conversations, fewer where their images reach the window's
pixel budget) is written whole, atomically, as regenerated/SHARD/FIRST-LAST.json in the cache (its conversations'
indices): a killed run keeps every finished window and the next run asks the engine only for the rest. A shard's
files are removed once it is committed. A prompt the engine refuses is a skip counted by reason (`engine_refused`).
"""

import json
import logging
import tempfile
from pathlib import Path

from transformers import AutoConfig

from cache_schema import CacheWriter
from cache_schema.layout import COUNT, TEXT, Each, Fields, Items, Rule
from extract.batching import windows
from extract.formats import SkipSample
from extract.progress import ShardProgress
from extract.prompts import Prompts, TurnPrompt
from extract.regenerate import Dialog, regenerate_turns
from extract.sources import IncompleteShard, conversations, output_shard_name
from extract.target import Target, load_processors
from engines import MEMORY_FRACTION, VllmWorker, engine_prompt

log = logging.getLogger("extract")

ANSWERS_DIR = "regenerated"
_IDS = Rule("a list of token ids", lambda v: isinstance(v, list) and all(type(t) is int and t >= 0 for t in v))
_SKIP = Rule("null or [reason, detail]", lambda v: v is None or (isinstance(v, list) and len(v) == 2
                                                                  and all(isinstance(x, str) for x in v)))
ANSWERS_SCHEMA = Fields({"source": TEXT, "engine": Each(TEXT), "conversations": Items(Fields(
    {"index": COUNT, "key": TEXT, "answers": Items(_IDS), "truncated": Rule("a boolean", lambda v: v in (True, False)),
     "skip": _SKIP}))})


class EngineGenerator:
    """Turn prompts -> the engine's (ids, cut) or SkipSample for each, as `regenerate_turns` takes them."""

    def __init__(self, prompts: Prompts, worker):
        self.prompts, self.worker = prompts, worker
        self.image_id = prompts.target.special_tokens.get("image_token_id")
        self.eos = set(prompts.target.eos_ids)
        self.generated_tokens, self.seconds = 0, 0.0

    def __call__(self, turns: list[TurnPrompt]) -> list:
        with tempfile.TemporaryDirectory(prefix="engine-images-") as tmp:
            requests = []
            for j, turn in enumerate(turns):
                ids = self.prompts.encode([turn])["input_ids"][0].tolist()
                requests.append(engine_prompt(ids, turn.images, self.image_id, Path(tmp) / str(j)))
            reply = self.worker.generate(requests)
        self.seconds += reply["seconds"]
        out = []
        for o in reply["outputs"]:
            if "error" in o:
                out.append(SkipSample("engine_refused", o["error"]))
                continue
            ids = o["ids"][:self.prompts.settings.max_new_tokens]
            self.generated_tokens += len(ids)
            out.append((ids, not (ids and ids[-1] in self.eos)))  # cut: no end-of-turn within max_new_tokens
        return out


def engine_config(cfg, target: Target, cuda: bool) -> dict:
    """The worker's settings: the target as extraction runs it, a context long enough that only our own
    `max_length` rule ever refuses a sequence."""
    g = cfg.generation
    local = Path(cfg.target.path).expanduser()
    model = str(local.resolve()) if local.exists() else str(cfg.target.path)  # the worker runs in its own folder
    # Past the model's own position limit the engine refuses to start; there it cuts an answer as `length`.
    limit = AutoConfig.from_pretrained(cfg.target.path).get_text_config().max_position_embeddings
    fraction = g.engine_memory_fraction or MEMORY_FRACTION["cuda" if cuda else "cpu"]
    return {"model": model, "dtype": cfg.target.dtype, "max_tokens": g.max_new_tokens,
            "max_model_len": min(g.max_length + g.max_new_tokens, limit), "memory_fraction": fraction,
            "tensor_parallel_size": g.engine_tensor_parallel, "images_per_prompt": g.engine_max_images,
            "stop_token_ids": target.eos_ids, "banned_token_ids": target.suppressed_ids}


def engine_devices(cfg, local_rank: int, cuda: bool) -> list[int] | None:
    """The GPUs of this rank's engine: `engine_tensor_parallel` of them, after those of the ranks before it."""
    if not cuda:
        return None
    tp = cfg.generation.engine_tensor_parallel
    return list(range(local_rank * tp, (local_rank + 1) * tp))


def window_name(window: list) -> str:
    """Named for the conversations it holds, so a run with another window size neither skips nor overwrites."""
    return f"{window[0].index:08d}-{window[-1].index:08d}.json"


def regenerate_shards(cfg, writer: CacheWriter, urls: list[str], rank: int, local_rank: int, cuda: bool,
                      stop=lambda url: None) -> None:
    """Every window of `urls` not yet answered, answered by one engine for them all (started only if needed).
    `stop(url)` is asked after every window saved and raises to stop there."""
    target = load_processors(cfg.target.path, cfg.target.model_type)
    prompts = Prompts(target, cfg.generation.settings())
    bar = ShardProgress(writer, len(urls), rank, cfg.progress, stage="regenerate")
    worker, engine = None, None
    try:
        for url in urls:
            name = output_shard_name(url)
            answered, asked, kept = load_answers(writer, url), 0, 0
            try:
                convs = conversations(url, cfg.data.format, lambda key, skip: None)  # counted when captured
                for window in windows(convs, cfg.generation.engine_window):
                    if all(c.index in answered for c in window):
                        kept += 1
                        bar.update(len(window), 0)
                        continue
                    asked += 1
                    if worker is None:
                        worker = VllmWorker(engine_config(cfg, target, cuda), cfg.generation.engine_python,
                                            engine_devices(cfg, local_rank, cuda))
                        engine = EngineGenerator(prompts, worker)
                        log.info("rank %d: vLLM %s on %s (%s runner) regenerates", rank, worker.info["version"],
                                 worker.info["device"], worker.info["runner"])
                    dialogs = [Dialog(c) for c in window]
                    regenerate_turns(prompts, dialogs, engine)
                    writer.loc.write_bytes_atomic(answers_json(url, worker.info, dialogs), ANSWERS_DIR, name,
                                                  window_name(window))
                    bar.update(len(window), 0, gen_tok_s=f"{engine.generated_tokens / max(engine.seconds, 1e-9):.0f}")
                    stop(url)
            except IncompleteShard as e:
                log.warning("%s; regeneration of its readable part is kept, capture retries the shard", e)
            log.info("regenerate %s: %d windows answered now, %d kept from an earlier run", name, asked, kept)
            bar.shard_done(0)
    finally:
        bar.close()
        if worker is not None:
            worker.close()


def answers_json(url: str, info: dict, dialogs: list[Dialog]) -> bytes:
    rows = [{"index": d.conv.index, "key": d.conv.key, "answers": d.answers, "truncated": d.truncated,
             "skip": None if d.skip is None else [d.skip.reason, d.skip.detail]} for d in dialogs]
    return json.dumps({"source": url, "engine": {k: str(v) for k, v in info.items()},
                       "conversations": rows}).encode()


def load_answers(writer: CacheWriter, url: str) -> dict[int, Dialog]:
    """The engine's regeneration of shard `url`, by conversation index; refused if the files do not belong to
    this shard."""
    name = output_shard_name(url)
    out = {}
    for file in sorted(writer.loc.files_under(ANSWERS_DIR, name)):
        if not file.endswith(".json"):
            continue
        data = writer.loc.read_json(ANSWERS_DIR, name, file, schema=ANSWERS_SCHEMA)
        if data["source"] != url:
            raise ValueError(f"{writer.loc.where(ANSWERS_DIR, name, file)} answers {data['source']}, not {url}")
        for row in data["conversations"]:
            skip = SkipSample(*row["skip"]) if row["skip"] else None
            out[row["index"]] = (row["key"], row["answers"], row["truncated"], skip)
    return out


def answered_dialogs(answers: dict, window: list) -> dict[int, Dialog]:
    """Dialogs of `window`'s conversations filled from the engine's answers; a conversation the answers do not
    hold, or hold under another key (the shard changed since), is refused."""
    out = {}
    for conv in window:
        row = answers.get(conv.index)
        if row is None:  # the shard broke off inside this window, or its files were removed: a rerun answers it
            raise IncompleteShard(conv.source, "engine_unanswered",
                                  f"conversation {conv.index} ({conv.key}) has no engine answer")
        if row[0] != conv.key:
            folder = f"{ANSWERS_DIR}/{output_shard_name(conv.source)}"
            raise ValueError(f"{conv.source}: conversation {conv.index} is {conv.key}, the engine answered "
                             f"{row[0]}: the shard changed since; remove {folder} from the cache and run again")
        _, ids, truncated, skip = row
        out[conv.index] = Dialog(conv, answers=ids, truncated=truncated, skip=skip)
    return out


def remove_answers(writer: CacheWriter, url: str) -> None:
    name = output_shard_name(url)
    loc = writer.loc
    if loc.exists(ANSWERS_DIR, name):
        loc.fs.rm(loc.path(ANSWERS_DIR, name), recursive=True)
    if loc.exists(ANSWERS_DIR) and not loc.fs.ls(loc.path(ANSWERS_DIR)):
        loc.fs.rm(loc.path(ANSWERS_DIR), recursive=True)
