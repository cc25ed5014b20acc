"""Extraction against Hugging Face's own outputs, on every tiny target family in fp32."""

import numpy as np
import pytest
import torch
import webdataset as wds

from cache_schema.codecs import bf16_to_words
from extract.capture import capture
from extract.formats import parse_sample
from extract.prompts import TurnPrompt
from extract.target import check_layer_ids, config_fingerprint, default_layer_ids, load_target
from helpers import prompts_of, sequences
from tools.fixtures.tiny_targets import FAMILIES


@pytest.fixture(scope="module")
def convs(demo_shards):
    records = list(wds.WebDataset([str(demo_shards[0])], shardshuffle=False, empty_check=False))
    return [parse_sample(r, source="demo") for r in records]


def test_default_layer_ids_follow_the_design_rule():
    assert default_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B
    assert default_layer_ids(48, 5, start=3) == [3, 14, 24, 35, 45]  # Qwen3-VL-30B-A3B after deepstack
    assert default_layer_ids(8, 3, start=2) == [2, 4, 5]


@pytest.mark.parametrize("ids, match", [([1, 8], "out of range"), ([1, 7], "last layer"), ([3, 2], "increasing"),
                                        ([-1, 2], "out of range"), ([], "empty")])
def test_invalid_layer_ids_are_refused(ids, match):
    with pytest.raises(ValueError, match=match):
        check_layer_ids(ids, num_layers=8, deepstack=0)


def test_deepstack_layer_ids_warn():
    with pytest.warns(UserWarning, match="deepstack"):
        check_layer_ids([1, 4], num_layers=8, deepstack=2)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_target_loaded_in_another_dtype_has_the_same_fingerprint_and_another_model_does_not(family, tiny_targets):
    """A cache extracted in bf16 from fp32 files is checked against the same files loaded in bf16 again (the vision
    families' sub-configs carry their own dtype, which is not the model's)."""
    prints = {dtype: config_fingerprint(load_target(str(tiny_targets / family), dtype=dtype, device="cpu").model.config)
              for dtype in ("float32", "bfloat16")}
    assert prints["float32"] == prints["bfloat16"]
    other = load_target(str(tiny_targets / family), dtype="float32", device="cpu").model.config
    other.get_text_config().rms_norm_eps *= 2
    assert config_fingerprint(other) != prints["float32"]


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_hidden_states_equal_hf_output_hidden_states(family, tiny_targets, convs):
    target = load_target(str(tiny_targets / family), dtype="float32", device="cpu")
    layer_ids = [i for i in [0, 2, 3, 6] if i >= target.traits.deepstack_layers(target.model.config)]
    seqs = sequences(target, convs[:4], max_new_tokens=12)
    for seq in seqs:
        sample, _ = capture(target, seq, layer_ids)
        with torch.no_grad():
            out = target.model(**seq.inputs, output_hidden_states=True)
        for j, layer in enumerate(layer_ids):
            ref = out.hidden_states[layer + 1][0]
            assert ref.shape == sample.hidden_TLH[:, j].shape
            np.testing.assert_array_equal(bf16_to_words(sample.hidden_TLH[:, j]), bf16_to_words(ref))
        # the fp32 capture itself, before bf16 storage
        with target.capture(layer_ids) as captured, torch.no_grad():
            target.model(**seq.inputs)
        for layer in layer_ids:
            diff = (captured[layer][0] - out.hidden_states[layer + 1][0]).abs().max().item()
            assert diff <= 1e-5, (family, layer, diff)
        # positions, against the M-RoPE rule: a text token is one past the largest position before it, on all
        # three axes; a still image's tokens share the next position on the temporal axis and spread from it on
        # the two spatial ones
        pos = sample.position_ids
        assert pos.shape == (3, len(sample))
        image = sample.input_ids == target.special_tokens.get("image_token_id", -1)
        top = -1
        for i in range(len(sample)):
            if not image[i]:
                assert (pos[:, i] == top + 1).all(), (family, i)
            top = max(top, pos[:, i].max())
        edges = np.flatnonzero(np.diff(np.concatenate([[0], image.astype(int), [0]])))
        for a, b in zip(edges[::2], edges[1::2]):
            assert (pos[0, a:b] == pos[0, a - 1] + 1).all() and (pos[1:, a:b].min(1) == pos[0, a]).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_regeneration_equals_generate_with_and_without_batching(family, tiny_targets, convs):
    target = load_target(str(tiny_targets / family), dtype="float32", device="cpu")
    batched = sequences(target, convs, max_new_tokens=20)
    single = [sequences(target, [c], max_new_tokens=20)[0] for c in convs]
    stopped = 0
    for b, s, conv in zip(batched, single, convs):
        assert b.answers == s.answers, conv.key
        # plain model.generate on the first turn's prompt, unpadded
        msgs = conv.messages[:conv.assistant_turns[0]]
        renderer = prompts_of(target)
        inputs = renderer.encode([TurnPrompt(renderer.render(msgs, True), conv.images[:sum(
            p["type"] == "image" for m in msgs for p in m["content"])])])
        out = target.model.generate(**inputs, do_sample=False, max_new_tokens=20, eos_token_id=target.eos_ids,
                                    suppress_tokens=target.suppressed_ids)
        ref = out[0, inputs["input_ids"].shape[1]:].tolist()
        assert b.answers[0] == ref[:len(b.answers[0])] and len(b.answers[0]) == len(ref), conv.key
        stopped += b.answers[0][-1] in target.eos_ids
    if family == "qwen3_vl":  # its end-of-turn row is tuned so that turns end by themselves (tools/fixtures/tiny_targets)
        assert 0 < stopped


def test_multi_turn_history_uses_regenerated_answers(tiny_targets, convs):
    target = load_target(str(tiny_targets / "qwen3_vl"), dtype="float32", device="cpu")
    conv = next(c for c in convs if len(c.assistant_turns) == 3)
    seq = sequences(target, [conv], max_new_tokens=24)[0]
    assert len(seq.answers) == 3  # the tiny qwen3_vl ends its turns by itself within the budget
    text = target.tokenizer.decode(seq.inputs["input_ids"][0])
    for answer in seq.answers[:-1]:
        assert prompts_of(target).answer_text(answer) in text
    for original in (m for m in conv.messages if m["role"] == "assistant"):
        assert original["content"][0]["text"] not in text


def test_system_prompt_and_thinking_switch_reach_the_prompt(tiny_targets):
    target = load_target(str(tiny_targets / "qwen3_5"), dtype="float32", device="cpu")
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hi?"}]}]
    thinking = prompts_of(target, system_prompt="Be brief.").render(msgs, True)
    plain = prompts_of(target, enable_thinking=False).render(msgs, True)
    assert thinking.startswith("<|im_start|>system\nBe brief.<|im_end|>") and thinking.endswith("<think>\n")
    assert plain.endswith("<think>\n\n</think>\n\n") and "system" not in plain
