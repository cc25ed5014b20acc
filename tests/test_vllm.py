"""The serving engine itself: vLLM's CPU build (`make setup-vllm`), run in its own interpreter through
tools.engines, regenerates exactly what extraction's transformers `generate` does on the prompts extraction
renders. Equal token for token: both run the tiny target in fp32 on the CPU, and its random logits have no
near-ties at this size (a tie would show as a first differing position, which the assertion names)."""

import pytest
import torch

from cache_schema import CacheReader
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


def test_vllm_serves_our_export_losslessly_and_accepts_what_the_offline_replay_predicts(served_target, tmp_path):
    """A drafter trained from the served target's cache, exported as speculators, run by unpatched vLLM: output
    equal to generate's, and vLLM's own acceptance counters equal to our replay of the cache on the same prompts.

    The drafter has one layer (vLLM 0.32's CPU rms_norm applies layer 0's k_norm to every layer, see
    docs/decisions.md) and the target is text-only (the CPU build's V1 runner feeds M-RoPE axis 0 on image
    prompts, token indices on text ones, which is what the drafter was trained with). Measured: equal to the
    count (187 drafts, 121 accepted, [114, 4, 3] by position). Both sides compute the drafter in fp32 with other
    kernels, so a near-tie could flip one draft token: the comparison allows 2% of the drafts."""
    from train.evaluate import evaluate_checkpoint
    from train.export import export
    from train.loop import train

    from extract.run import run as extract
    from helpers import extract_config, tiny
    from tools.fixtures.demo_shards import write_shards

    shards = write_shards(tmp_path / "shards", shards=3, samples=16)
    extract(extract_config(tmp_path / "cache", shards, served_target, layer_ids=[1, 3, 5], max_new_tokens=32))
    train(tiny(tmp_path / "cache", tmp_path / "run", "drafter.num_layers=1", "drafter.head_dim=32",
               "drafter.block_size=4", "optim.max_steps=60", "optim.lr=3e-3", "eval_every=0", "save_every=0"))
    export(tmp_path / "run", "speculators", tmp_path / "export", dtype="float32")

    target = load_target(str(served_target), dtype="float32", device="cpu")
    prompts = Prompts(target, GenerationSettings(max_new_tokens=32))
    keys, ids = [], []
    for conv in shard_conversations(str(shards[-1])):  # the run's held-out shard
        try:
            ids.append(last_turn_prompt(prompts, conv)["input_ids"][0].tolist())
            keys.append(conv.key)
        except SkipSample:
            pass
    request = {"model": str(served_target), "dtype": "float32", "max_model_len": 2048, "prompts": ids,
               "max_tokens": 32, "stop_token_ids": target.eos_ids,
               "speculative_config": {"method": "dflash", "model": str(tmp_path / "export"),
                                      "num_speculative_tokens": 3}}
    served = run_vllm(request)
    for key, prompt, out in zip(keys, ids, served["outputs"]):
        batch = {"input_ids": torch.tensor([prompt]), "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
        assert out == generate(target, batch, 32)[0][0], f"{key}: speculative output differs from generate"

    replay = evaluate_checkpoint(tmp_path / "run", shards=CacheReader(str(tmp_path / "cache")).shards[-1],
                                 out=tmp_path / "eval", progress=False)
    ours = [a for s in replay["per_sample"] if s["key"] in set(keys) for a in s["dflash"]["accepted"]]
    engine = served["spec_decode"]
    slack = max(1, round(0.02 * len(ours)))
    assert abs(engine["num_drafts"] - len(ours)) <= slack
    assert abs(engine["num_accepted_tokens"] - sum(ours)) <= slack
    per_position = [sum(a >= k for a in ours) for k in (1, 2, 3)]
    assert all(abs(e - o) <= slack for e, o in zip(engine["num_accepted_tokens_per_pos"], per_position))
    assert sum(ours) > 0.2 * len(ours)  # the drafter is accepted at all: a comparison of zeros would prove nothing


def test_our_images_are_the_pixels_vllms_own_loader_gives(tmp_path):
    """Every image mode of tests/test_hostile.py, decoded by extraction and by vLLM's ImageMediaIO in its own
    interpreter: the same RGB pixels."""
    import io
    import subprocess

    import numpy as np

    from extract.formats import decode_image
    from test_hostile import image_cases

    names = []
    for name, (img, fmt, save) in image_cases().items():
        buf = io.BytesIO()
        img.save(buf, format=fmt, **save)
        (tmp_path / name).write_bytes(buf.getvalue())
        names.append(name)
    script = ("import sys, numpy as np\nfrom vllm.multimodal.media.image import ImageMediaIO\n"
              "for name in sys.argv[2:]:\n"
              "    img = ImageMediaIO().load_bytes(open(f'{sys.argv[1]}/{name}', 'rb').read())\n"
              "    np.save(f'{sys.argv[1]}/{name}.npy', np.asarray(getattr(img, 'media', img).convert('RGB')))\n")
    subprocess.run([str(vllm_python()), "-c", script, str(tmp_path), *names], check=True, capture_output=True,
                   cwd=tmp_path, timeout=300)
    for name in names:
        ours = np.asarray(decode_image((tmp_path / name).read_bytes(), name))
        np.testing.assert_array_equal(ours, np.load(tmp_path / f"{name}.npy"), err_msg=name)
