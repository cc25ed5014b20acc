"""Greedy regeneration of every assistant turn, and the final token sequence of each conversation with its
supervised spans (prompts come from extract/prompts.py).

Turns are regenerated in order, each conditioned on the regenerated history; a batch of conversations is
generated together with left padding (which changes no token: see tests/test_extract_model.py). A sequence is
the chat text up to where the model starts writing its last turn, encoded, followed by that turn's ids: the
model's own when regenerated. Earlier turns are the template's rendering of their text (extract/spans.py finds
them).
"""

from dataclasses import dataclass, field

import torch

from extract.formats import Conversation, SkipSample, as_skip, guarded, machine_error
from extract.prompts import Prompts, TurnPrompt, images_in
from extract.spans import answer_char_spans, answer_token_spans
from extract.target import Target


@dataclass
class Sequence:
    """The final token sequence of one conversation, its processor inputs and its supervised spans."""

    conv: Conversation
    inputs: dict  # processor outputs for the whole sequence, batch of 1
    spans: list[tuple[int, int]]  # [start, end) of each supervised assistant span
    images: int  # images in the sequence (a conversation cut after a truncated turn holds fewer than it has)
    turns: int  # assistant turns in the sequence
    truncated_turns: int = 0  # 1 when the last turn was cut at max_new_tokens
    dropped_turns: int = 0  # assistant turns after a cut one, not in the sequence
    generated_tokens: int = 0
    answers: list[list[int]] = field(default_factory=list)  # regenerated ids per turn, the model's own
    engine_ids: int = 0  # 1 when the last turn's ids came with the record (a serving engine's own tokens)
    retokenized_differs: int = 0  # 1 when re-tokenising that turn's text gives other ids than the record's


def generate(target: Target, batch: dict, max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuation of a left-padded batch; each row cut after its first end-of-turn token."""
    eos = target.eos_ids
    batch = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out = target.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=target.special_tokens.get("pad_token_id", eos[0]),
                                suppress_tokens=target.suppressed_ids or None, temperature=None, top_p=None, top_k=None)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    answers, truncated = [], []
    for row in new:
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row if stop is None else row[:stop + 1])
        truncated.append(stop is None)
    return answers, truncated


@dataclass
class Dialog:
    """One conversation's regeneration so far."""

    conv: Conversation
    answers: list[list[int]] = field(default_factory=list)  # generated ids per turn
    prompt: TurnPrompt | None = None  # the latest turn's prompt
    truncated: bool = False  # the latest turn hit max_new_tokens: the conversation ends with it
    skip: SkipSample | None = None  # why the conversation is skipped, raised when its sequence is built

    @property
    def open(self) -> bool:
        return self.skip is None and not self.truncated and len(self.answers) < len(self.conv.assistant_turns)


def regenerate_turns(prompts: Prompts, dialogs: list[Dialog]) -> None:
    """Generate the next turn of every open dialog, batched, until none is open. A dialog whose prompt cannot be
    rendered, processed or generated from, or is too long, keeps its SkipSample on `skip`; the batch goes on
    without it."""
    while active := [d for d in dialogs if d.open]:
        for d in active:
            d.prompt = _guard(d, "unrenderable", prompts.turn, d.conv, len(d.answers), d.answers)
        active, batch = _encoded(prompts, _alive(active))
        for d, n in zip(active, batch["attention_mask"].sum(-1).tolist() if batch else []):
            _guard(d, "too_long", prompts.check_length, n)
        if len(_alive(active)) < len(active):  # re-pad the batch without the skipped prompts
            active, batch = _encoded(prompts, _alive(active))
        if not active:
            continue

        def step(ds, batch=batch):
            # The batch already encoded serves the whole set; a subset (isolating a failure) is encoded anew.
            encoded = batch if ds is active else prompts.encode([d.prompt for d in ds])
            return list(zip(*generate(prompts.target, encoded, prompts.settings.max_new_tokens)))

        answers = _batched(active, step, "generation_failed")
        for d, (ids, cut) in zip(_alive(active), answers or []):
            d.answers.append(ids)
            d.truncated = cut


def _alive(dialogs: list[Dialog]) -> list[Dialog]:
    return [d for d in dialogs if d.skip is None]


def _encoded(prompts: Prompts, dialogs: list[Dialog]) -> tuple[list[Dialog], dict | None]:
    """The dialogs whose prompts the processor takes, and their batch."""
    batch = _batched(dialogs, lambda ds: prompts.encode([d.prompt for d in ds]), "unprocessable")
    return _alive(dialogs), batch


def _guard(d: Dialog, reason: str, fn, *args):
    """`fn(*args)` for one dialog; a failure becomes its skip (and None is returned)."""
    try:
        return guarded(reason, fn, *args)
    except SkipSample as skip:
        d.skip = skip
        return None


def _batched(dialogs: list[Dialog], step, reason: str):
    """`step(dialogs)` for the whole batch; if it fails, each dialog alone finds the ones that fail (their skip
    set, by `reason`), and the batch is run again without them. Returns the result for the dialogs left with no
    skip, or None when none is left."""
    if not dialogs:
        return None
    try:
        return step(dialogs)
    except Exception as e:  # noqa: BLE001 - which conversation made the batch fail is found below
        if machine_error(e):
            raise
        if len(dialogs) == 1:
            dialogs[0].skip = as_skip(reason, e)
            return None
        for d in dialogs:
            _guard(d, reason, step, [d])
        left = _alive(dialogs)
        if len(left) == len(dialogs):  # every one works alone: the batch itself fails, which no skip explains
            raise
    return step(left) if left else None


def _assemble(prompts: Prompts, context: str, images: list, answer_ids: list[int],
              earlier_turns: int) -> tuple[dict, list]:
    """`context` (the chat text up to where the model starts writing) encoded, then `answer_ids` appended; spans
    of the earlier assistant turns found in `context` by characters, and of the appended answer."""
    inputs = prompts.encode([TurnPrompt(context, images)])
    ids = inputs["input_ids"][0].tolist()
    history = answer_token_spans(prompts.target.tokenizer, prompts.chat, context, ids, prompts.suffix)
    if len(history) != earlier_turns or any(a == b for a, b in history):
        raise SkipSample("unsupervised_turn", f"{earlier_turns} earlier assistant turns, "
                         f"{sum(b > a for a, b in history)} found with a supervised token in the rendered prompt")
    prompts.check_length(len(ids) + len(answer_ids), "sequence")
    spans = (history if prompts.settings.supervise_history else []) + [(len(ids), len(ids) + len(answer_ids))]
    return _extend(inputs, answer_ids), spans


def _regenerated(prompts: Prompts, d: Dialog) -> Sequence:
    if d.skip is not None:
        raise d.skip
    inputs, spans = _assemble(prompts, d.prompt.text, d.prompt.images, d.answers[-1], len(d.answers) - 1)
    return Sequence(conv=d.conv, inputs=inputs, spans=spans, images=len(d.prompt.images), turns=len(d.answers),
                    truncated_turns=int(d.truncated),
                    dropped_turns=len(d.conv.assistant_turns) - len(d.answers),
                    generated_tokens=sum(map(len, d.answers)), answers=d.answers)


def kept_rendering(prompts: Prompts, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """The whole conversation (up to its last answer) as the template renders it with the dataset's own answers,
    and each answer's characters: with `regenerate=false`, the last answer's context is this text up to it."""
    text = prompts.render(conv.messages[:conv.assistant_turns[-1] + 1], False)
    prompts.check_chars(text)
    chars = answer_char_spans(text, prompts.chat, prompts.suffix)
    if len(chars) != len(conv.assistant_turns):
        raise SkipSample("unsupervised_turn", f"{len(conv.assistant_turns)} assistant turns, {len(chars)} found "
                         "in the rendered conversation")
    return text, chars


def _kept(prompts: Prompts, conv: Conversation) -> Sequence:
    """The dataset's own answers: the last one cut from the template's rendering of the whole conversation
    (after its header and any think scaffolding) and encoded as the model would write it, by itself; or, when
    the record carries them, the ids a serving engine generated for it (a mismatch with the text's own
    encoding is counted)."""
    target = prompts.target
    messages = conv.messages[:conv.assistant_turns[-1] + 1]
    text, chars = kept_rendering(prompts, conv)
    start, end = chars[-1]
    answer = text[start:end - len(prompts.chat.end_of_turn)]
    answer_ids = target.tokenizer.encode(answer, add_special_tokens=False)
    given, differs = messages[-1].get("token_ids"), 0
    if given is not None:
        # A serving engine's ids are the target's own tokens; the text alone may re-tokenise differently.
        own = given[:-1] if given and given[-1] in target.eos_ids else list(given)
        if own and max(own) >= len(target.tokenizer):
            raise SkipSample("unknown_format", f"token_ids hold id {max(own)} outside the tokenizer "
                             f"({len(target.tokenizer)} tokens)")
        differs, answer_ids = int(own != answer_ids), own
    answer_ids.append(target.token_id(prompts.chat.end_of_turn))
    images = images_in(messages, conv)
    inputs, spans = _assemble(prompts, text[:start], images, answer_ids, len(chars) - 1)
    return Sequence(conv=conv, inputs=inputs, spans=spans, images=len(images), turns=len(chars),
                    engine_ids=int(given is not None),
                    retokenized_differs=differs)


def build_sequences(prompts: Prompts, convs: list[Conversation], on_skip) -> list[Sequence]:
    """Regenerate (or keep, `regenerate=false`) every assistant turn; one Sequence per conversation that is not
    skipped. A skip is raised where it is found and handed to `on_skip(key, SkipSample)`, as the sources do.

    The last turn of each sequence is supervised as the model writes it after the generation prompt; a turn
    cut at `max_new_tokens` ends its conversation (later turns are dropped and counted in the Sequence), so no
    end-of-turn token the model did not write is ever appended. Earlier turns are supervised as the template
    renders them, unless `supervise_history` is false.
    """
    if prompts.settings.regenerate:
        dialogs = [Dialog(c) for c in convs]
        regenerate_turns(prompts, dialogs)
        jobs = [(d.conv.key, _regenerated, d) for d in dialogs]
    else:
        jobs = [(c.key, _kept, c) for c in convs]
    out = []
    for key, job, item in jobs:
        try:
            out.append(guarded("unprocessable", job, prompts, item))
        except SkipSample as skip:
            on_skip(key, skip)
    return out


def last_turn_prompt(prompts: Prompts, conv: Conversation) -> dict:
    """The last assistant turn's context exactly as extraction caches it, encoded (batch of 1): earlier turns
    regenerated greedily first and the generation prompt rendered, or with `regenerate=false` the template's
    rendering of the dataset's conversation cut where the last answer starts (a thinking template's empty
    think block included). Raises the SkipSample extraction would skip the conversation with."""
    last = len(conv.assistant_turns) - 1
    if not prompts.settings.regenerate:
        text, chars = guarded("unrenderable", kept_rendering, prompts, conv)
        images = images_in(conv.messages[:conv.assistant_turns[-1]], conv)
        prompt = TurnPrompt(text[:chars[-1][0]], images)
    else:
        dialog = Dialog(Conversation(conv.key, conv.source, conv.messages[:conv.assistant_turns[-1]], conv.images))
        regenerate_turns(prompts, [dialog])
        if dialog.skip is not None:
            raise dialog.skip
        if dialog.truncated:
            raise SkipSample("history_truncated", "an earlier turn hit max_new_tokens: extraction ends the "
                             "conversation there")
        prompt = guarded("unrenderable", prompts.turn, conv, last, dialog.answers)
    batch = guarded("unprocessable", prompts.encode, [prompt])
    prompts.check_length(batch["input_ids"].shape[1])
    return batch


def _extend(inputs: dict, new_ids: list[int]) -> dict:
    """Append generated ids to single-sample processor outputs (text tokens: mm type 0, mask 1)."""
    add = torch.tensor([new_ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], add], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(add)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(add)], dim=1)
    return out
