"""Prompt rendering with the target's own chat template, greedy regeneration of every assistant turn, and the
final token sequence of each conversation with its supervised spans.

Turns are regenerated in order, each conditioned on the regenerated history; a batch of conversations is
generated together with left padding (which changes no token: see tests/test_extract_model.py). A sequence is
the chat text up to where the model starts writing its last turn, encoded, followed by that turn's ids: the
model's own when regenerated. Earlier turns are the template's rendering of their text (extract/spans.py finds
them).
"""

from dataclasses import dataclass, field

import torch

from extract.formats import Conversation, SkipSample
from extract.spans import END, HEADER, answer_char_spans, answer_token_spans
from extract.target import SUPPRESSED_TOKENS, Target


@dataclass
class Sequence:
    """The final token sequence of one conversation, its processor inputs and its supervised spans."""

    conv: Conversation
    inputs: dict  # processor outputs for the whole sequence, batch of 1
    spans: list[tuple[int, int]]  # [start, end) of each supervised assistant span
    truncated_turns: int = 0  # 1 when the last turn was cut at max_new_tokens
    dropped_turns: int = 0  # assistant turns after a cut one, not in the sequence
    generated_tokens: int = 0
    answers: list[list[int]] = field(default_factory=list)  # regenerated ids per turn, the model's own
    engine_ids: int = 0  # 1 when the last turn's ids came with the record (a serving engine's own tokens)
    retokenized_differs: int = 0  # 1 when re-tokenising that turn's text gives other ids than the record's


def _content_for(target: Target, parts: list[dict]):
    if target.is_vision:
        return parts
    return "".join(p.get("text", "") for p in parts if p["type"] == "text")


def render(target: Target, messages: list[dict], add_generation_prompt: bool, system_prompt: str | None,
           enable_thinking: bool | None) -> str:
    msgs = [{"role": m["role"], "content": _content_for(target, m["content"])} for m in messages]
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": _content_for(target, [{"type": "text", "text": system_prompt}])})
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    return target.processor.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt,
                                                **kwargs)


def encode(target: Target, texts: list[str], images: list[list]) -> dict:
    """Tokenise (and for vision targets, preprocess images) with left padding."""
    if target.is_vision:
        flat = [img for imgs in images for img in imgs]
        return dict(target.processor(text=texts, images=flat or None, padding=True, padding_side="left",
                                     return_tensors="pt"))
    return dict(target.processor(texts, padding=True, padding_side="left", return_tensors="pt"))


def history_messages(conv: Conversation, upto: int, answers: list[str]) -> list[dict]:
    """Messages before message index `upto`, earlier assistant turns replaced by their regenerations."""
    out, a = [], 0
    for m in conv.messages[:upto]:
        if m["role"] == "assistant":
            m = {"role": "assistant", "content": [{"type": "text", "text": answers[a]}]}
            a += 1
        out.append(m)
    return out


def images_in(messages: list[dict], conv: Conversation) -> list:
    n = sum(p["type"] == "image" for m in messages for p in m["content"])
    return conv.images[:n]


def generate(target: Target, batch: dict, max_new_tokens: int) -> tuple[list[list[int]], list[bool]]:
    """Greedy continuation of a left-padded batch; each row cut after its first end-of-turn token."""
    eos = target.eos_ids
    suppress = [t for t in (target.token_id(s) for s in SUPPRESSED_TOKENS) if t is not None]
    batch = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in batch.items()}
    out = target.model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                pad_token_id=target.special_tokens.get("pad_token_id", eos[0]),
                                suppress_tokens=suppress or None, temperature=None, top_p=None, top_k=None)
    new = out[:, batch["input_ids"].shape[1]:].tolist()
    answers, truncated = [], []
    for row in new:
        stop = next((i for i, t in enumerate(row) if t in eos), None)
        answers.append(row if stop is None else row[:stop + 1])
        truncated.append(stop is None)
    return answers, truncated


def answer_text(target: Target, ids: list[int]) -> str:
    if ids and ids[-1] in target.eos_ids:
        ids = ids[:-1]
    return target.tokenizer.decode(ids, skip_special_tokens=False)


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


@dataclass
class Dialog:
    """One conversation's regeneration so far."""

    conv: Conversation
    answers: list[list[int]] = field(default_factory=list)  # generated ids per turn
    prompt: tuple[str, list] | None = None  # the latest turn's prompt text and its images
    truncated: bool = False  # the latest turn hit max_new_tokens: the conversation ends with it
    skip: SkipSample | None = None

    @property
    def open(self) -> bool:
        return self.skip is None and not self.truncated and len(self.answers) < len(self.conv.assistant_turns)


def regenerate_turns(target: Target, dialogs: list[Dialog], max_new_tokens: int, max_length: int,
                     render_msgs) -> None:
    """Generate the next turn of every open dialog, batched, until none is open."""
    while active := [d for d in dialogs if d.open]:
        for d in active:
            msgs = history_messages(d.conv, d.conv.assistant_turns[len(d.answers)],
                            [answer_text(target, a) for a in d.answers])
            d.prompt = (render_msgs(msgs, True), images_in(msgs, d.conv))
        batch = encode(target, [d.prompt[0] for d in active], [d.prompt[1] for d in active])
        for d, n in zip(active, batch["attention_mask"].sum(-1).tolist()):
            if n > max_length:
                d.skip = SkipSample("too_long", f"prompt of {n} tokens > max_length {max_length}")
        if any(d.skip for d in active):  # re-pad the batch without the skipped prompts
            active = [d for d in active if d.skip is None]
            if not active:
                continue
            batch = encode(target, [d.prompt[0] for d in active], [d.prompt[1] for d in active])
        for d, ids, cut in zip(active, *generate(target, batch, max_new_tokens)):
            d.answers.append(ids)
            d.truncated = cut


def prompt_suffix(render_msgs) -> str:
    """What the generation prompt writes after the assistant header (e.g. "<think>\\n"): template text."""
    probe = [{"role": "user", "content": [{"type": "text", "text": "?"}]}]
    with_prompt, without = render_msgs(probe, True), render_msgs(probe, False)
    if not with_prompt.startswith(without + HEADER):
        raise ValueError(f"chat template: the generation prompt must open with {HEADER!r}; it adds "
                         f"{with_prompt[len(without):]!r}")
    return with_prompt[len(without) + len(HEADER):]


def _assemble(target: Target, context: str, images: list, answer_ids: list[int], earlier_turns: int,
              suffix: str, supervise_history: bool, max_length: int) -> tuple[dict, list] | SkipSample:
    """`context` (the chat text up to where the model starts writing) encoded, then `answer_ids` appended; spans
    of the earlier assistant turns found in `context` by characters, and of the appended answer."""
    inputs = encode(target, [context], [images])
    ids = inputs["input_ids"][0].tolist()
    history = answer_token_spans(target.tokenizer, context, ids, suffix)
    if len(history) != earlier_turns or any(a == b for a, b in history):
        return SkipSample("unsupervised_turn", f"{earlier_turns} earlier assistant turns, "
                          f"{sum(b > a for a, b in history)} found with a supervised token in the rendered prompt")
    if len(ids) + len(answer_ids) > max_length:
        return SkipSample("too_long", f"{len(ids) + len(answer_ids)} tokens > max_length {max_length}")
    spans = (history if supervise_history else []) + [(len(ids), len(ids) + len(answer_ids))]
    return _extend(inputs, answer_ids), spans


def _regenerated(target: Target, d: Dialog, suffix: str, supervise_history: bool,
                 max_length: int) -> Sequence | SkipSample:
    text, images = d.prompt
    out = _assemble(target, text, images, d.answers[-1], len(d.answers) - 1, suffix, supervise_history,
                    max_length)
    if isinstance(out, SkipSample):
        return out
    dropped = len(d.conv.assistant_turns) - len(d.answers)
    return Sequence(conv=d.conv, inputs=out[0], spans=out[1], truncated_turns=int(d.truncated),
                    dropped_turns=dropped, generated_tokens=sum(map(len, d.answers)), answers=d.answers)


def _kept(target: Target, conv: Conversation, render_msgs, suffix: str, supervise_history: bool,
          max_length: int) -> Sequence | SkipSample:
    """The dataset's own answers: the last one cut from the template's rendering of the whole conversation
    (after its header and any think scaffolding) and encoded as the model would write it, by itself; or, when
    the record carries them, the ids a serving engine generated for it (a mismatch with the text's own
    encoding is counted)."""
    messages = conv.messages[:conv.assistant_turns[-1] + 1]
    text = render_msgs(messages, False)
    chars = answer_char_spans(text, suffix)
    if len(chars) != len(conv.assistant_turns):
        return SkipSample("unsupervised_turn", f"{len(conv.assistant_turns)} assistant turns, {len(chars)} found "
                          "in the rendered conversation")
    start, end = chars[-1]
    answer_ids = target.tokenizer.encode(text[start:end - len(END)], add_special_tokens=False)
    given, differs = messages[-1].get("token_ids"), 0
    if given is not None:
        # A serving engine's ids are the target's own tokens; the text alone may re-tokenise differently.
        own = given[:-1] if given and given[-1] in target.eos_ids else list(given)
        if own and max(own) >= len(target.tokenizer):
            return SkipSample("unknown_format", f"token_ids hold id {max(own)} outside the tokenizer "
                              f"({len(target.tokenizer)} tokens)")
        differs, answer_ids = int(own != answer_ids), own
    answer_ids.append(target.special_tokens["im_end_id"])
    out = _assemble(target, text[:start], images_in(messages, conv), answer_ids, len(chars) - 1, suffix,
                    supervise_history, max_length)
    if isinstance(out, SkipSample):
        return out
    return Sequence(conv=conv, inputs=out[0], spans=out[1], engine_ids=int(given is not None),
                    retokenized_differs=differs)


def build_sequences(target: Target, convs: list[Conversation], regenerate: bool, max_new_tokens: int,
                    max_length: int, system_prompt: str | None = None, enable_thinking: bool | None = None,
                    supervise_history: bool = True) -> list[Sequence | SkipSample]:
    """Regenerate (or keep) every assistant turn; return one Sequence, or the SkipSample that stopped it.

    The last turn of each sequence is supervised as the model writes it after the generation prompt; a turn
    cut at `max_new_tokens` ends its conversation (later turns are dropped and counted in the Sequence), so no
    end-of-turn token the model did not write is ever appended. Earlier turns are supervised as the template
    renders them, unless `supervise_history` is false.
    """
    def render_msgs(messages, gen_prompt):
        return render(target, messages, gen_prompt, system_prompt, enable_thinking)

    suffix = prompt_suffix(render_msgs)
    if not regenerate:
        return [_kept(target, c, render_msgs, suffix, supervise_history, max_length) for c in convs]
    dialogs = [Dialog(c) for c in convs]
    regenerate_turns(target, dialogs, max_new_tokens, max_length, render_msgs)
    return [d.skip or _regenerated(target, d, suffix, supervise_history, max_length) for d in dialogs]


def _extend(inputs: dict, new_ids: list[int]) -> dict:
    """Append generated ids to single-sample processor outputs (text tokens: mm type 0, mask 1)."""
    add = torch.tensor([new_ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], add], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(add)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(add)], dim=1)
    return out
