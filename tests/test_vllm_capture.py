"""Hidden states captured through vLLM's CPU build (engines/vllm_capture.py and its connector) equal the ones
extraction captures with transformers, family by family, one engine start per target:

- the committed learned Qwen3-VL in fp32, held-out prompts with two images, one image and none: the engine runs the
  processor's expanded token ids and its layers' outputs agree with transformers' hooks within fp32 rounding
  (measured at most 2.7e-6 relative, per token);
- the learned Qwen3.5 (Gated DeltaNet, full attention every 4th layer) widened to linear-attention heads of 64
  (tools/demo/linear_heads.py), in bf16, the only dtype vLLM's CPU kernels run it in: same ids, every layer alive,
  states within bf16 rounding (measured below);
- a tiny random text-only Qwen3 with attention heads of 32, in fp32, on 16 text prompts (measured at most 9.7e-8);

and a target the engine cannot run (the committed Qwen3.5 in fp32) is one line in the engine's words."""

import pytest
import torch

from engines import MEMORY_FRACTION, EngineError, engine_prompt, vllm_python
from engines.vllm_client import run_capture
from tools.demo.pipeline import COMMITTED, COMMITTED_TARGET

pytestmark = [pytest.mark.skipif(vllm_python() is None, reason="no vLLM interpreter: make setup-vllm"),
              pytest.mark.usefixtures("one_thread")]
LEARNED = COMMITTED_TARGET / "model"
QWEN35, QWEN35_CONF = COMMITTED["qwen3_5"]
# Per token, |vLLM - transformers| / |transformers|: fp32 kernels summing in another order stay within a few dozen
# units of its precision (1.2e-7); a layer off by one differs by about 1 on the learned targets (at least 5e-3 on
# the tiny random Qwen3, whose unit-variance embeddings dominate every layer's output).
TOLERANCE = 1e-5
# The same in bf16 (eps 7.8e-3), where both sides round every op and the roundings compound over layers. Measured on
# the widened Qwen3.5, 8 held-out prompts, at ids [1, 3, 5]: per token at most 9.4e-3, 1.9e-2, 1.6e-2 and per prompt
# on average at most 3.4e-3, 5.4e-3, 6.2e-3 (capturing all 8 layers: at most 4.1e-2, at layer 7). That is bf16's own
# rounding: transformers' bf16 is as far from its fp32 on the same model (per token at most 1.3e-2, 1.2e-2, 1.3e-2,
# on average 4.3e-3, 5.2e-3, 6.1e-3), and vLLM's bf16 no further from that fp32 than transformers' bf16 (below).
# A layer off by one differs by at least 0.6 per token at worst and 0.15 on average.
BF16_TOLERANCE = 5e-2
BF16_MEAN_TOLERANCE = 1.5e-2


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per token and layer, |got - want| / |want| ([T, L] of rows [T, L, H]), in fp32."""
    got, want = got.float(), want.float()
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


def assert_alive(states: torch.Tensor, what: str) -> None:
    """Finite, and no layer all zero (vLLM #46301 once captured all-zero states for hybrid targets)."""
    assert torch.isfinite(states).all(), f"{what}: a state not finite"
    dead = (states.float().abs().amax(dim=(0, 2)) == 0).nonzero().flatten().tolist()
    assert not dead, f"{what}: layers at positions {dead} all zero"


def heldout(target, tmp, n: int = 8) -> list[tuple[dict, list]]:
    """`n` held-out scene prompts (with their images) rendered for `target`, keeping the dataset's earlier answers
    (`regenerate=false`): what is compared is the capture."""
    from extract.prompts import GenerationSettings, Prompts, images_in
    from extract.regenerate import last_turn_prompt
    from tools.demo import scenes
    from tools.spec_decode import shard_conversations

    renderer = Prompts(target, GenerationSettings(regenerate=False))
    shards = scenes.write_task_shards(tmp / "shards", "heldout", n)
    return [(last_turn_prompt(renderer, c), images_in(c.messages[:c.assistant_turns[-1]], c))
            for c in shard_conversations(",".join(map(str, shards)))]


def transformers_states(target, prompts, layer_ids: list[int]) -> list[torch.Tensor]:
    """Per prompt, the layers' outputs [T, L, H] as extraction's hooks capture them."""
    want = []
    with torch.no_grad(), target.capture(layer_ids) as captured:
        for batch, _ in prompts:
            target.model(**batch, use_cache=False, logits_to_keep=1)
            want.append(torch.stack([captured[i][0] for i in layer_ids], dim=1))
    return want


def capture_request(model, dtype: str, layer_ids: list[int], prompts, image_id: int | None, tmp) -> dict:
    return {"model": str(model), "dtype": dtype, "max_model_len": 2048, "layer_ids": layer_ids,
            "memory_fraction": MEMORY_FRACTION["cpu"],
            "prompts": [engine_prompt(b["input_ids"][0].tolist(), images, image_id, tmp / f"prompt-{i}")
                        for i, (b, images) in enumerate(prompts)]}


def layer_ids_of(conf: str) -> list[int]:
    from omegaconf import OmegaConf

    from helpers import ROOT

    return list(OmegaConf.load(ROOT / "conf" / "target" / f"{conf}.yaml").layer_ids)


def assert_same_ids(prompts, got) -> None:
    assert len(got) == len(prompts)
    for i, ((batch, images), theirs) in enumerate(zip(prompts, got)):
        assert torch.equal(theirs["ids"].long(), batch["input_ids"][0]), f"prompt {i} ({len(images)} images): ids"


@pytest.fixture(scope="module")
def captures(tmp_path_factory):
    """(held-out prompts with their images, transformers' states, vLLM's captures, the request) on the learned
    Qwen3-VL at its ids, fp32."""
    from extract.target import load_target

    tmp = tmp_path_factory.mktemp("capture")
    layer_ids = layer_ids_of("learned")
    target = load_target(str(LEARNED), dtype="float32", device="cpu")
    prompts = heldout(target, tmp)
    want = transformers_states(target, prompts, layer_ids)
    request = capture_request(LEARNED, "float32", layer_ids, prompts, target.special_tokens["image_token_id"], tmp)
    return prompts, want, run_capture(request), request


@pytest.fixture(scope="module")
def qwen35_captures(tmp_path_factory):
    """(held-out prompts, transformers' bf16 states, transformers' fp32 states, vLLM's bf16 captures, the request)
    on the learned Qwen3.5 widened to heads of 64, at its ids."""
    from extract.target import load_target
    from tools.demo.linear_heads import servable

    tmp = tmp_path_factory.mktemp("capture-qwen35")
    model = servable(QWEN35 / "model", tmp)
    layer_ids = layer_ids_of(QWEN35_CONF)
    target = load_target(str(model), dtype="bfloat16", device="cpu")
    prompts = heldout(target, tmp)
    want = transformers_states(target, prompts, layer_ids)
    exact = transformers_states(load_target(str(model), dtype="float32", device="cpu"), prompts, layer_ids)
    request = capture_request(model, "bfloat16", layer_ids, prompts, target.special_tokens["image_token_id"], tmp)
    return prompts, want, exact, run_capture(request), request


@pytest.fixture(scope="module")
def qwen3_captures(tmp_path_factory, demo_shards):
    """(text prompts, transformers' states, vLLM's captures) on a tiny random Qwen3 with heads of 32 (vLLM's CPU
    attention takes 32, 64, ..., not the fixture's 16), fp32, at its first, a middle and its last layer: the demo
    shards rendered as tests/test_vllm.py renders them, keeping their answers."""
    from extract.prompts import GenerationSettings, Prompts
    from extract.regenerate import last_turn_prompt
    from extract.target import load_target
    from tools.fixtures.tiny_targets import build_target
    from tools.spec_decode import shard_conversations

    model = build_target("qwen3", tmp_path_factory.mktemp("capture-qwen3"), text_overrides={"head_dim": 32},
                         name="qwen3-h32")
    target = load_target(str(model), dtype="float32", device="cpu")
    layer_ids = [0, 3, target.model.config.num_hidden_layers - 1]
    renderer = Prompts(target, GenerationSettings(regenerate=False))
    prompts = [(last_turn_prompt(renderer, c), []) for c in shard_conversations(",".join(map(str, demo_shards)))]
    want = transformers_states(target, prompts, layer_ids)
    got = run_capture({"model": str(model), "dtype": "float32", "max_model_len": 2048, "layer_ids": layer_ids,
                       "memory_fraction": MEMORY_FRACTION["cpu"],
                       "prompts": [{"ids": b["input_ids"][0].tolist()} for b, _ in prompts]})
    return prompts, want, got


def test_vllm_captures_the_processors_tokens_and_transformers_states(captures):
    prompts, want, got, _ = captures
    assert {len(images) for _, images in prompts} >= {0, 1, 2}
    assert_same_ids(prompts, got)
    for i, ((_, images), ours, theirs) in enumerate(zip(prompts, want, got)):
        assert theirs["states"].dtype == torch.float32 and theirs["states"].shape == ours.shape
        assert_alive(theirs["states"], f"prompt {i}")
        error = relative_error(theirs["states"], ours).amax(dim=0)
        assert (error < TOLERANCE).all(), f"prompt {i} ({len(images)} images): relative error {error.tolist()}"


def test_an_image_prompt_at_a_deepstack_layer_is_refused(captures):
    """Qwen3-VL's deepstack layers (0 and 1 here) add visual features to image tokens after the layer: vLLM captures
    their output with them, transformers' hooks without. The engine refuses before it starts."""
    *_, request = captures
    with pytest.raises(EngineError, match=r"layer ids \[1\] lie in the deepstack layers 0..1"):
        run_capture({**request, "layer_ids": [1, 3]})


def test_vllm_captures_the_hybrid_qwen35_in_bf16_within_its_rounding(qwen35_captures):
    """Every layer alive on image and text prompts, the same ids, states within bf16 rounding of transformers' (see
    BF16_TOLERANCE), and as close to the fp32 computation as transformers' own bf16 (the mean error per layer within
    1.25 times; measured 0.98 to 1.00): what differs is rounding, not the function."""
    prompts, want, exact, got, _ = qwen35_captures
    assert {len(images) for _, images in prompts} >= {0, 1, 2}
    assert_same_ids(prompts, got)
    for i, ((_, images), ours, theirs) in enumerate(zip(prompts, want, got)):
        assert theirs["states"].dtype == torch.bfloat16 and theirs["states"].shape == ours.shape
        assert_alive(theirs["states"], f"prompt {i} ({len(images)} images)")
        error = relative_error(theirs["states"], ours)
        assert (error.amax(dim=0) < BF16_TOLERANCE).all(), f"prompt {i}: per token {error.amax(dim=0).tolist()}"
        assert (error.mean(dim=0) < BF16_MEAN_TOLERANCE).all(), f"prompt {i}: mean {error.mean(dim=0).tolist()}"
    theirs = torch.cat([relative_error(g["states"], e) for g, e in zip(got, exact)]).mean(dim=0)
    ours = torch.cat([relative_error(w, e) for w, e in zip(want, exact)]).mean(dim=0)
    assert (theirs < 1.25 * ours).all(), f"from fp32: vLLM's bf16 {theirs.tolist()}, transformers' {ours.tolist()}"


def test_vllm_captures_a_text_qwen3_in_fp32(qwen3_captures):
    prompts, want, got = qwen3_captures
    assert len(prompts) >= 8
    assert_same_ids(prompts, got)
    for i, (ours, theirs) in enumerate(zip(want, got)):
        assert theirs["states"].dtype == torch.float32 and theirs["states"].shape == ours.shape
        assert_alive(theirs["states"], f"prompt {i}")
        error = relative_error(theirs["states"], ours).amax(dim=0)
        assert (error < TOLERANCE).all(), f"prompt {i}: relative error {error.tolist()}"


def test_a_target_the_engine_cannot_run_is_one_line_in_its_words(qwen35_captures):
    """The committed Qwen3.5 in fp32: vLLM's CPU build runs Gated DeltaNet in bf16 only. The engine starts and
    fails at the first prefill; the error is the kernel's own line, the engine's output its note."""
    prompts, *_, request = qwen35_captures
    text = next(p for (_, images), p in zip(prompts, request["prompts"]) if not images)
    with pytest.raises(EngineError) as failed:
        run_capture({**request, "model": str(QWEN35 / "model"), "dtype": "float32", "max_model_len": 256,
                     "prompts": [text]})
    assert str(failed.value) == ("vLLM cannot run this target (AssertionError: CPU GDN attention requires BF16.); "
                                 "nothing of this window was written")


def test_an_engine_that_dies_unheard_is_its_outputs_last_error_line(tmp_path):
    """When the engine dies before it can answer (killed, or failed in a process of its own), the error is the last
    exception line of its output, its rank prefix dropped. No engine runs: a stand-in does."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho '[rank0]: Traceback (most recent call last):' >&2\n"
                    "echo '[rank0]: RuntimeError: Unexpected head dim size, 32' >&2\n"
                    "echo 'shutting down' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(EngineError) as failed:
        run_capture({"model": "m", "layer_ids": [1], "prompts": [{"ids": [1]}]}, python=fake)
    assert str(failed.value) == ("the vLLM engine process ended (exit 3) before answering; its last words: "
                                 "RuntimeError: Unexpected head dim size, 32")
