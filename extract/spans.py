"""Which tokens are supervised: each assistant answer's own characters, found in the rendered chat text and
mapped to tokens through the fast tokenizer's offsets.

Working on characters keeps the spans independent of how a role header's last characters merge with an
answer's first ones (the Qwen vocabularies merge "\\n\\n", so `<|im_start|>assistant\\n` followed by an answer
that opens with a newline is not the header's token sequence followed by the answer's). A token is
supervised only when all of its characters belong to the answer, so template text is never a label. The
markup (header, end of turn, empty think block, vision placeholders) is the family's (extract/families.py).
"""

from bisect import bisect_left

import numpy as np

from extract.families import ChatMarkup


def answer_char_spans(text: str, chat: ChatMarkup, prompt_suffix: str = "") -> list[tuple[int, int]]:
    """[start, end) characters of each closed assistant answer in `text`, its end-of-turn token included.

    An answer starts after the header and after what the template writes there itself: an empty think
    block, else the generation prompt's own suffix (`prompt_suffix`, e.g. "<think>\\n"). A header with no
    closing end-of-turn token (a generation prompt) is not an answer.
    """
    header, end_of_turn = chat.assistant_header, chat.end_of_turn
    spans, i = [], 0
    while (h := text.find(header, i)) >= 0:
        start = h + len(header)
        end = text.find(end_of_turn, start)
        if end < 0:
            break
        for prefix in (chat.empty_think, prompt_suffix):
            if prefix and text.startswith(prefix, start) and start + len(prefix) <= end:
                start += len(prefix)
                break
        spans.append((start, end + len(end_of_turn)))
        i = end + len(end_of_turn)
    return spans


def chars_to_tokens(offsets: list[tuple[int, int]], char_spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Token spans [start, end) of the tokens whose characters lie wholly inside each character span (offsets
    ascend, as a tokenizer's do)."""
    starts, out = [s for s, _ in offsets], []
    for a, b in char_spans:
        first = end = bisect_left(starts, a)
        while end < len(offsets) and offsets[end][1] <= b:
            end += 1
        out.append((first, end))
    return out


def align(text_ids: list[int], ids: list[int], expanded: set[int]) -> list[int]:
    """Index in `ids` of each token of `text_ids`, where a token in `expanded` stands for a run of itself in `ids`
    (the processor's expansion of vision placeholders)."""
    where, j = [], 0
    for t in text_ids:
        assert j < len(ids) and ids[j] == t, f"processor ids differ from the tokenizer's at {j}"
        where.append(j)
        j += 1
        if t in expanded:
            while j < len(ids) and ids[j] == t:
                j += 1
    assert j == len(ids), "processor ids longer than the tokenizer's"
    return where


def answer_token_spans(tokenizer, chat: ChatMarkup, text: str, ids: list[int],
                       prompt_suffix: str = "") -> list[tuple[int, int]]:
    """Token spans in `ids` (the processor's encoding of `text`) of each closed assistant answer in `text`.

    An answer none of whose tokens lies wholly inside its characters comes back as an empty span (start ==
    end), for the caller to count.
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    expanded = {tokenizer.convert_tokens_to_ids(p) for p in chat.expanded} - {None, tokenizer.unk_token_id}
    where = align(enc["input_ids"], ids, expanded)
    spans = chars_to_tokens(enc["offset_mapping"], answer_char_spans(text, chat, prompt_suffix))
    return [(where[a], where[b - 1] + 1) if b > a else (0, 0) for a, b in spans]


def loss_mask(length: int, spans: list[tuple[int, int]]) -> np.ndarray:
    mask = np.zeros(length, dtype=bool)
    for start, end in spans:
        mask[start:end] = True
    return mask
