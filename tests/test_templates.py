"""Loss masks under each real Qwen chat-template family (tools/fixtures/tiny_targets.py writes one per family): the
supervised tokens are exactly what the model writes after the generation prompt, plus its end-of-turn token."""

import dataclasses
import json

import numpy as np
import pytest
import webdataset as wds

from extract.families import QWEN_CHAT
from extract.formats import Conversation, SkipSample, parse_sample
from extract.regenerate import Sequence, last_turn_prompt
from extract.spans import answer_char_spans, chars_to_tokens, loss_mask
from extract.target import load_target
from helpers import prompts_of, sequences
from tools.fixtures.tiny_targets import SHAPES, build_target

HEADER, END, EMPTY_THINK = QWEN_CHAT.assistant_header, QWEN_CHAT.end_of_turn, QWEN_CHAT.empty_think

# (family of the tiny model, chat template variant, enable_thinking). The qwen3_vl model ends its turns by
# itself, so it carries the thinking templates too, to give regenerated history turns under each of them;
# the qwen3_5 model never stops within the budget, which exercises the truncation path.
CASES = [("qwen3_vl", "qwen3_vl", None), ("qwen3_vl", "qwen3_vl_thinking", None),
         ("qwen3_vl", "qwen3_5", True), ("qwen3_vl", "qwen3_5", False),
         ("qwen3_5", "qwen3_5", True), ("qwen3_5", "qwen3_5", False),
         ("qwen3", "qwen3", True), ("qwen3", "qwen3", False)]


def generation_prompt(template: str, thinking: bool | None) -> str:
    """What each published template writes after `<|im_start|>assistant\\n` in its generation prompt."""
    if template in ("qwen3", "qwen3_5") and thinking is False:
        return EMPTY_THINK
    return {"qwen3_vl": "", "qwen3": "", "qwen3_vl_thinking": "<think>\n", "qwen3_5": "<think>\n"}[template]


def shown(template: str, text: str, last: bool) -> str:
    """A reasoning-free answer as the template renders it: Qwen3.5 trims every message; the thinking templates
    cut reasoning from earlier turns and leading newlines from the last answer."""
    if template == "qwen3_5":
        text = text.strip()
    if template != "qwen3_vl" and "</think>" in text and not last:
        text = text.split("</think>")[-1].lstrip("\n")
    if template != "qwen3_vl" and last:
        text = text.lstrip("\n")
    return text


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


@pytest.fixture(scope="module")
def convs(demo_shards):
    records = list(wds.WebDataset([str(demo_shards[0])], shardshuffle=False, empty_check=False))
    return [parse_sample(r, source="demo") for r in records]


@pytest.fixture(scope="module")
def targets(tiny_targets, tmp_path_factory):
    """Loaded tiny targets by (family, template); templates other than a family's own are built here."""
    out, cache = tmp_path_factory.mktemp("template_targets"), {}

    def get(family, template):
        if (family, template) not in cache:
            path = (tiny_targets / family if SHAPES[family].template == template
                    else build_target(family, out, template=template))
            cache[family, template] = load_target(str(path), dtype="float32", device="cpu")
        return cache[family, template]
    return get


def test_tiny_tokenizer_merges_whitespace_runs_like_the_real_vocabularies(targets):
    tok = targets("qwen3_vl", "qwen3_vl").tokenizer
    assert tok.tokenize("\n\n") == ["ĊĊ"]
    # the merge that made a newline-led answer lose its header match: the header's "\n" joins the answer's
    pieces = tok.tokenize(HEADER + "\nTwo cats.")
    assert "ĊĊ" in pieces and "Ċ" not in pieces


@pytest.mark.parametrize("regenerate", [False, True], ids=["dataset", "regenerate"])
@pytest.mark.parametrize("family, template, thinking", CASES)
def test_supervised_spans_are_exactly_what_the_model_writes(family, template, thinking, regenerate, targets, convs):
    target = targets(family, template)
    tok, im_end = target.tokenizer, target.special_tokens["im_end_id"]
    seqs = sequences(target, convs, regenerate, max_new_tokens=24, enable_thinking=thinking)
    histories = 0
    for conv, seq in zip(convs, seqs):
        assert isinstance(seq, Sequence), (conv.key, seq)
        ids = seq.inputs["input_ids"][0].tolist()
        got = runs(loss_mask(len(ids), seq.spans))
        answers = [m["content"][0]["text"] for m in conv.messages if m["role"] == "assistant"]
        # no assistant turn of the sequence is left without supervision
        assert len(got) == (len(seq.answers) if regenerate else len(answers)), conv.key
        a, b = got[-1]
        assert b == len(ids)
        if regenerate:  # the model's own ids, and only them
            assert ids[a:] == seq.answers[-1]
            cut = seq.answers[-1][-1] not in target.eos_ids
            assert seq.truncated_turns == int(cut)
            assert seq.dropped_turns == len(answers) - len(seq.answers) and (cut or not seq.dropped_turns)
            history = [prompts_of(target).answer_text(x) for x in seq.answers[:-1]]
            assert tok.decode(ids[:a]).endswith(HEADER + generation_prompt(template, thinking))
        else:  # the answer as the template shows it, encoded by itself as the model would write it
            answer = shown(template, answers[-1], last=True)
            assert ids[a:] == tok.encode(answer, add_special_tokens=False) + [im_end]
            assert tok.decode(ids[a:]) == answer + END
            # think scaffolding the template puts before a reasoning-free answer is context, never a label
            assert tok.decode(ids[:a]).endswith(HEADER + ("" if template == "qwen3_vl" else EMPTY_THINK))
            history = answers[:-1]
        # earlier turns: the template's rendering of their text and <|im_end|>; only whitespace that merged
        # into the header's last token is left out
        for (a, b), text in zip(got[:-1], history):
            full, span = shown(template, text, last=False) + END, tok.decode(ids[a:b])
            assert full.endswith(span) and full[:len(full) - len(span)].strip() == "", (conv.key, full, span)
            assert ids[b - 1] == im_end
            histories += 1
    if regenerate and family == "qwen3_5":
        assert all(s.truncated_turns for s in seqs)  # this model never stops: every sequence ends with a cut turn
    else:
        assert histories > 0


@pytest.fixture(scope="module")
def reasoning_convs():
    """A newline-led last answer after a history turn with reasoning; and a last answer with reasoning."""
    def conv(key, last):
        texts = ["What is here?", "<think>\nlooking\n</think>\n\nTwo cats.", "And now?", last]
        return Conversation(key=key, source="t", messages=[
            {"role": r, "content": [{"type": "text", "text": t}]} for r, t in zip(["user", "assistant"] * 2, texts)])
    return [conv("newline", "\nA dog.\n\nIt runs."), conv("reasoning", "<think>\nhmm\n</think>\n\nA dog.")]


# Supervised text of each assistant turn of `reasoning_convs` in dataset mode, and the text just before the
# last one. Thinking templates drop a history turn's reasoning; a last answer's reasoning is the model's writing,
# less the "<think>\n" a generation prompt already wrote.
EXPECTED = {
    ("qwen3_vl", None): [["<think>\nlooking\n</think>\n\nTwo cats.", "\nA dog.\n\nIt runs."], [HEADER],
                         ["<think>\nlooking\n</think>\n\nTwo cats.", "<think>\nhmm\n</think>\n\nA dog."], [HEADER]],
    ("qwen3", True): [["Two cats.", "A dog.\n\nIt runs."], [EMPTY_THINK],
                      ["Two cats.", "<think>\nhmm\n</think>\n\nA dog."], [HEADER]],
    ("qwen3", False): [["Two cats.", "A dog.\n\nIt runs."], [EMPTY_THINK],
                       ["Two cats.", "<think>\nhmm\n</think>\n\nA dog."], [HEADER]],
    ("qwen3_vl_thinking", None): [["Two cats.", "A dog.\n\nIt runs."], [EMPTY_THINK],
                                  ["Two cats.", "hmm\n</think>\n\nA dog."], [HEADER + "<think>\n"]],
    ("qwen3_5", True): [["Two cats.", "A dog.\n\nIt runs."], [EMPTY_THINK],
                        ["Two cats.", "hmm\n</think>\n\nA dog."], [HEADER + "<think>\n"]],
    ("qwen3_5", False): [["Two cats.", "A dog.\n\nIt runs."], [EMPTY_THINK],
                         ["Two cats.", "<think>\nhmm\n</think>\n\nA dog."], [HEADER]],
}


@pytest.mark.parametrize("template, thinking", list(EXPECTED))
def test_dataset_answers_with_reasoning_and_leading_newlines(template, thinking, targets, reasoning_convs):
    family = "qwen3" if template == "qwen3" else "qwen3_vl"
    target = targets(family, template)
    tok = target.tokenizer
    seqs = sequences(target, reasoning_convs, regenerate=False, max_new_tokens=8,
                           enable_thinking=thinking)
    exp = EXPECTED[template, thinking]
    for seq, (answers, (before,)) in zip(seqs, [exp[:2], exp[2:]]):
        ids = seq.inputs["input_ids"][0].tolist()
        assert [tok.decode(ids[a:b]) for a, b in seq.spans] == [t + END for t in answers]
        assert tok.decode(ids[:seq.spans[-1][0]]).endswith(before)
    # the newline-led last answer is its own tokens: "\n" is not merged into the header's "\n"
    ids = seqs[0].inputs["input_ids"][0].tolist()
    if template == "qwen3_vl":
        assert tok.convert_ids_to_tokens(ids[seqs[0].spans[-1][0]]) == "Ċ"
    # without history supervision only the last answer is a label
    only_last = sequences(target, reasoning_convs, regenerate=False, max_new_tokens=8,
                                enable_thinking=thinking, supervise_history=False)
    assert [s.spans for s in only_last] == [s.spans[-1:] for s in seqs]


def test_history_turn_led_by_a_newline_keeps_its_supervision(targets, reasoning_convs):
    """As a history turn, a newline-led answer shares its first token with the header: the rest is supervised."""
    target = targets("qwen3_vl", "qwen3_vl")
    conv = reasoning_convs[0]
    msgs = conv.messages + [{"role": "user", "content": [{"type": "text", "text": "More?"}]},
                            {"role": "assistant", "content": [{"type": "text", "text": "No."}]}]
    seq = sequences(target, [dataclasses.replace(conv, messages=msgs)], regenerate=False, max_new_tokens=8)[0]
    ids = seq.inputs["input_ids"][0].tolist()
    a, b = seq.spans[1]
    assert target.tokenizer.decode(ids[a:b]) == "A dog.\n\nIt runs." + END
    assert target.tokenizer.convert_ids_to_tokens(ids[a - 1]) == "ĊĊ"  # header "\n" + the answer's "\n"


def test_a_turn_cut_at_max_new_tokens_ends_the_sequence_with_the_models_own_ids(targets, convs):
    target = targets("qwen3_vl", "qwen3_vl")
    # One conversation whose second question shows an image of its own: cut after the first turn, it must go.
    base = next(c for c in convs if len(c.assistant_turns) == 3 and c.images)
    later = [dict(m) for m in base.messages]
    second_user = later[base.assistant_turns[0] + 1]
    second_user["content"] = [{"type": "image"}, *second_user["content"]]
    extra = dataclasses.replace(base, key="later-image", messages=later, images=[*base.images, base.images[0]])
    seqs = sequences(target, [*convs, extra], max_new_tokens=3)
    multi = [s for s in seqs if len(s.conv.assistant_turns) == 3]
    assert multi
    for seq in seqs:
        ids = seq.inputs["input_ids"][0].tolist()
        last = seq.answers[-1]
        assert len(last) == 3 and last[-1] not in target.eos_ids  # cut: no end-of-turn the model did not write
        assert seq.truncated_turns == 1 and len(seq.answers) == 1
        assert seq.dropped_turns == len(seq.conv.assistant_turns) - 1
        assert seq.spans == [(len(ids) - 3, len(ids))] and ids[-3:] == last
        # The counts the cache keeps describe the cut sequence, not the whole conversation.
        first = seq.conv.messages[:seq.conv.assistant_turns[0]]
        assert seq.turns == 1 and seq.images == sum(p["type"] == "image" for m in first for p in m["content"])
    assert any(s.images < len(s.conv.images) for s in multi)  # a later turn's image was cut with it


BROKEN = """{%- for m in messages -%}{%- if m.role != 'assistant' -%}
{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' -}}{%- endif -%}{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"""


@pytest.mark.parametrize("regenerate", [False, True], ids=["dataset", "regenerate"])
def test_assistant_turn_missing_from_the_rendering_is_a_counted_skip(regenerate, targets, reasoning_convs):
    target = dataclasses.replace(targets("qwen3", "qwen3"))
    target.processor = target.tokenizer = target.tokenizer.__class__.from_pretrained(target.name_or_path)
    target.tokenizer.chat_template = BROKEN  # drops every assistant turn
    results = sequences(target, reasoning_convs, regenerate, max_new_tokens=30)
    for r in results:
        assert isinstance(r, SkipSample) and r.reason == "unsupervised_turn", r


def test_char_spans_map_to_the_tokens_wholly_inside_them(targets):
    tok = targets("qwen3_vl", "qwen3_vl").tokenizer
    text = ("<|im_start|>user\nHi<|im_end|>\n" + HEADER + "\nA cat.<|im_end|>\n" + HEADER + EMPTY_THINK
            + "Dog é.<|im_end|>\n" + HEADER + "<think>\n")
    chars = answer_char_spans(text, QWEN_CHAT, prompt_suffix="<think>\n")
    assert [text[a:b] for a, b in chars] == ["\nA cat." + END, "Dog é." + END]  # the open prompt is no answer
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    naive = [[i for i, (s, e) in enumerate(offsets) if a <= s and e <= b] for a, b in chars]
    assert [list(range(a, b)) for a, b in chars_to_tokens(offsets, chars)] == naive


def test_serving_engine_token_ids_are_kept_and_a_retokenisation_mismatch_counted(targets):
    """A last answer with the engine's ids: they are supervised as given (end token and all), and a split the
    text alone would not produce is counted; no ids: the text's own encoding, nothing counted."""
    target = targets("qwen3_vl", "qwen3_vl")
    tok = target.tokenizer
    answer = "A red circle and a blue square."
    canonical = tok.encode(answer, add_special_tokens=False)
    by_chars = [i for ch in answer for i in tok.encode(ch, add_special_tokens=False)]
    assert by_chars != canonical  # the character-by-character split is one the tokenizer would not choose
    im_end = target.special_tokens["im_end_id"]

    def conv(key, ids):
        last = {"role": "assistant", "content": [{"type": "text", "text": answer}]}
        if ids is not None:
            last["token_ids"] = ids
        return Conversation(key=key, source="t", messages=[
            {"role": "user", "content": [{"type": "text", "text": "What is here?"}]}, last])

    cases = {"none": None, "same": canonical + [im_end], "split": by_chars, "split_end": by_chars + [im_end]}
    seqs = sequences(target, [conv(k, v) for k, v in cases.items()], regenerate=False, max_new_tokens=8)
    supervised = {k: s.inputs["input_ids"][0, s.spans[-1][0]:s.spans[-1][1]].tolist() for k, s in zip(cases, seqs)}
    assert supervised["none"] == supervised["same"] == canonical + [im_end]
    assert supervised["split"] == supervised["split_end"] == by_chars + [im_end]
    assert [(s.engine_ids, s.retokenized_differs) for s in seqs] == [(0, 0), (1, 0), (1, 1), (1, 1)]
    out_of_vocab = sequences(target, [conv("bad", [len(tok) + 5])], regenerate=False, max_new_tokens=8)[0]
    assert isinstance(out_of_vocab, SkipSample) and out_of_vocab.reason == "unknown_format"


@pytest.mark.parametrize("ids", ["12", [1, -2], [1.5], [True]])
def test_malformed_token_ids_are_a_counted_skip(ids):
    record = {"__key__": "k", "json": json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "ho",
                                                                "token_ids": ids}]}).encode()}
    with pytest.raises(SkipSample, match="token_ids"):
        parse_sample(record, source="t")


# The qwen3_5 model never ends a turn within the budget: regenerated, its conversations end at the first turn.
@pytest.mark.parametrize("family, template, thinking, regenerate",
                         [(*case, r) for case in CASES for r in (False, True) if not (case[0] == "qwen3_5" and r)])
def test_spec_decode_prompts_are_the_context_extraction_caches(family, template, thinking, regenerate, targets,
                                                               reasoning_convs):
    """tools.spec_decode decodes from `last_turn_prompt`: it must be exactly the cached ids before the last
    answer, under every template and thinking switch (with dataset answers too, where the template's rendering
    of the whole conversation, empty think block included, is what was cached)."""
    target = targets(family, template)
    settings = dict(regenerate=regenerate, max_new_tokens=24, enable_thinking=thinking)
    prompts = prompts_of(target, **settings)
    checked = 0
    for conv, seq in zip(reasoning_convs, sequences(target, reasoning_convs, **settings)):
        if isinstance(seq, SkipSample) or seq.truncated_turns or seq.dropped_turns:
            continue
        ids = seq.inputs["input_ids"][0].tolist()
        assert last_turn_prompt(prompts, conv)["input_ids"][0].tolist() == ids[:seq.spans[-1][0]], conv.key
        checked += 1
    assert checked
