"""Prompt rendering with the target's own chat template, and greedy regeneration of every assistant turn.

Turns are regenerated in order, each conditioned on the regenerated history; a batch of conversations is
generated together with left padding (which changes no token: see tests/test_extract_model.py).
"""

from dataclasses import dataclass, field

import torch

from extract.formats import Conversation, SkipSample
from extract.target import SUPPRESSED_TOKENS, Target


@dataclass
class Sequence:
    """The final token sequence of one conversation, its processor inputs and its supervised spans."""

    conv: Conversation
    inputs: dict  # processor outputs for the whole sequence, batch of 1
    spans: list[tuple[int, int]]  # [start, end) of each supervised assistant span
    truncated_turns: int = 0
    generated_tokens: int = 0
    answers: list[list[int]] = field(default_factory=list)


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


def _history(conv: Conversation, upto: int, answers: list[str]) -> list[dict]:
    """Messages before message index `upto`, earlier assistant turns replaced by their regenerations."""
    out, a = [], 0
    for m in conv.messages[:upto]:
        if m["role"] == "assistant":
            m = {"role": "assistant", "content": [{"type": "text", "text": answers[a]}]}
            a += 1
        out.append(m)
    return out


def _images_in(messages: list[dict], conv: Conversation) -> list:
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


def _answer_text(target: Target, ids: list[int]) -> str:
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


def assistant_header(target: Target) -> list[int]:
    return target.tokenizer.encode("<|im_start|>assistant\n", add_special_tokens=False)


def build_sequences(target: Target, convs: list[Conversation], regenerate: bool, max_new_tokens: int,
                    max_length: int, system_prompt: str | None = None,
                    enable_thinking: bool | None = None) -> list[Sequence | SkipSample]:
    """Regenerate (or keep) every assistant turn; return one Sequence, or the SkipSample that stopped it."""
    def render_msgs(messages, gen_prompt):
        return render(target, messages, gen_prompt, system_prompt, enable_thinking)

    results: list[Sequence | SkipSample | None] = [None] * len(convs)
    answers: list[list[list[int]]] = [[] for _ in convs]
    truncated = [0] * len(convs)
    prompts: list[tuple[str, list] | None] = [None] * len(convs)  # the latest turn's prompt text and images
    if regenerate:
        for t in range(max(len(c.assistant_turns) for c in convs)):
            active = [i for i, c in enumerate(convs) if results[i] is None and t < len(c.assistant_turns)]
            if not active:
                break
            for i in active:
                history = [_answer_text(target, a) for a in answers[i]]
                msgs = _history(convs[i], convs[i].assistant_turns[t], history)
                prompts[i] = (render_msgs(msgs, True), _images_in(msgs, convs[i]))
            batch = encode(target, [prompts[i][0] for i in active], [prompts[i][1] for i in active])
            for i, n in zip(active, batch["attention_mask"].sum(-1).tolist()):
                if n > max_length:
                    results[i] = SkipSample("too_long", f"prompt of {n} tokens > max_length {max_length}")
            if any(results[i] is not None for i in active):  # re-pad the batch without the skipped prompts
                active = [i for i in active if results[i] is None]
                if not active:
                    continue
                batch = encode(target, [prompts[i][0] for i in active], [prompts[i][1] for i in active])
            for i, ids, cut in zip(active, *generate(target, batch, max_new_tokens)):
                answers[i].append(ids)
                truncated[i] += int(cut)

    header, im_end = assistant_header(target), target.special_tokens["im_end_id"]
    for i, conv in enumerate(convs):
        if results[i] is not None:
            continue
        if regenerate:
            inputs = encode(target, [prompts[i][0]], [prompts[i][1]])
            prompt = inputs["input_ids"][0].tolist()
            last = answers[i][-1]
            spans = header_spans(prompt, header, im_end) + [(len(prompt), len(prompt) + len(last))]
            inputs = _extend(inputs, last)
        else:
            inputs = encode(target, [render_msgs(conv.messages, False)], [conv.images])
            spans = header_spans(inputs["input_ids"][0].tolist(), header, im_end)
        length = inputs["input_ids"].shape[1]
        if length > max_length:
            results[i] = SkipSample("too_long", f"{length} tokens > max_length {max_length}")
            continue
        results[i] = Sequence(conv=conv, inputs=inputs, spans=spans, truncated_turns=truncated[i],
                              generated_tokens=sum(map(len, answers[i])), answers=answers[i])
    return results


def _extend(inputs: dict, new_ids: list[int]) -> dict:
    """Append generated ids to single-sample processor outputs (text tokens: mm type 0, mask 1)."""
    add = torch.tensor([new_ids], dtype=inputs["input_ids"].dtype)
    out = dict(inputs)
    out["input_ids"] = torch.cat([inputs["input_ids"], add], dim=1)
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(add)], dim=1)
    if "mm_token_type_ids" in inputs:
        out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(add)], dim=1)
    return out
