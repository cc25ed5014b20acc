"""The serving engine itself: vLLM's CPU build (`make setup-vllm`), run in its own interpreter through
tools.engines, regenerates exactly what extraction's transformers `generate` does on the prompts extraction
renders. Equal token for token: both run the tiny target in fp32 on the CPU, and its random logits have no
near-ties at this size (a tie would show as a first differing position, which the assertion names)."""

import pytest

from extract.formats import SkipSample
from extract.prompts import GenerationSettings, Prompts
from extract.regenerate import generate, last_turn_prompt
from extract.target import SUPPRESSED_TOKENS, load_target
from tools.engines import run_vllm, vllm_python
from tools.fixtures.tiny_targets import build_target
from tools.spec_decode import shard_conversations

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM interpreter: make setup-vllm")
MAX_NEW = 16


@pytest.fixture(scope="module")
def served_target(tmp_path_factory):
    """The tiny text target with heads of 32, a size vLLM's CPU attention kernel takes (16 is not), and an
    end-of-turn row that lets some answers end by themselves within MAX_NEW tokens and others be cut."""
    return build_target("qwen3", tmp_path_factory.mktemp("vllm"), text_overrides={"head_dim": 32}, name="qwen3-h32",
                        end_scale=1.5)


def test_vllm_greedy_equals_extractions_generate_on_the_rendered_prompts(served_target, demo_shards):
    target = load_target(str(served_target), dtype="float32", device="cpu")
    prompts = Prompts(target, GenerationSettings(max_new_tokens=MAX_NEW))
    convs, batches = [], []
    for conv in shard_conversations(",".join(map(str, demo_shards))):
        try:
            batches.append(last_turn_prompt(prompts, conv))
            convs.append(conv)
        except SkipSample:  # an earlier turn cut at MAX_NEW: extraction ends such a conversation there
            pass
    assert len(batches) >= 8
    want = [generate(target, b, MAX_NEW)[0][0] for b in batches]
    banned = [t for t in (target.token_id(s) for s in SUPPRESSED_TOKENS) if t is not None]
    result = run_vllm({"model": str(served_target), "dtype": "float32", "max_model_len": 2048,
                       "prompts": [b["input_ids"][0].tolist() for b in batches], "max_tokens": MAX_NEW,
                       "stop_token_ids": target.eos_ids, "banned_token_ids": banned})
    assert result["vllm"] == "0.32.0"
    for conv, ours, theirs in zip(convs, want, result["outputs"]):
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
        assert theirs == ours, f"{conv.key}: vLLM differs from generate at answer token {first}"
    assert any(o[-1] in target.eos_ids for o in want) and any(len(o) == MAX_NEW for o in want)  # both stops seen
