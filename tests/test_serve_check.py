"""The serve check's diagnosis (`tools.serve_check.diagnose`) on reports made up here: each cause is named exactly
when what it explains was measured. The engine itself is in tests/test_vllm.py."""

import pytest

from tools.serve_check import diagnose


def figures(drafts: int, accepted: int, overwritten: int = 0) -> dict:
    return {"drafts": drafts, "accepted": accepted, "acceptance_length": 1 + accepted / drafts,
            "overwritten_context": overwritten}


def report(ours, as_served, engine, images: int = 1, trained: str = "sequential", layers: int = 1) -> dict:
    prompt = {"key": "p0", "images": images, "reference": [1, 2], "engine_greedy": [1, 2],
              "engine_speculative": [1, 2], "partings": {}}
    return {"ours": ours, "ours_as_served": as_served, "engine": engine, "prompts": [prompt],
            "position_source": "sequential" if trained == "mixed" else trained, "trained_position_source": trained,
            "runner_position_source": "mrope_axis0", "engine_name": "vllm", "runner": "v1", "engine_device": "cpu",
            "hidden_dtype": "bf16", "drafter_layers": layers}


def causes(r: dict) -> list[str]:
    return [c["cause"] for c in diagnose(r)]


def test_a_token_index_drafter_on_the_v1_runner_names_positions_and_slots():
    served = figures(171, 146, overwritten=220)
    assert causes(report(figures(159, 161), served, figures(171, 146))) == ["position source", "shared slots"]


def test_an_axis0_drafter_names_only_the_slots():
    served = figures(199, 117, overwritten=220)
    assert causes(report(figures(208, 107), served, figures(199, 117), trained="mrope_axis0")) == ["shared slots"]


def test_text_prompts_name_neither_positions_nor_slots_but_rounding():
    assert causes(report(figures(100, 150), figures(120, 120), figures(120, 120), images=0)) == ["cache rounding"]


@pytest.mark.parametrize("layers, cause", [(2, "vLLM CPU rms_norm defect"), (1, "unexplained")])
def test_an_engine_apart_from_our_replay_as_served(layers, cause):
    same = figures(100, 150)
    assert causes(report(same, same, figures(100, 100), images=0, layers=layers)) == [cause]


def test_a_mixed_drafter_names_the_position_source_as_such():
    served = figures(171, 146, overwritten=10)
    named = diagnose(report(figures(159, 161), served, figures(171, 146), trained="mixed"))
    assert [c["cause"] for c in named] == ["position source", "shared slots"] and "(mixed)" in named[0]["detail"]


def parted(tie: bool) -> dict:
    """A prompt whose engine answers part from transformers' and from each other at answer token 1."""
    at = {"at": 1, "gap": 0.01 if tie else 2.0, "tie": tie}
    return {"engine_greedy": [1, 3], "engine_speculative": [1, 4],
            "partings": {"engine_greedy_vs_transformers": at, "engine_vs_its_greedy": at}}


def test_engine_greedy_output_and_verification_come_first():
    r = report(figures(100, 150), figures(100, 150), figures(100, 100), images=0)
    r["prompts"][0].update(parted(tie=False))
    assert causes(r)[:2] == ["prompts or target differ", "engine verification"]


def test_answers_that_part_at_a_tie_name_neither():
    """bf16 on two sets of kernels: answers parting where the target's logits tie are no loss and no other prompt."""
    r = report(figures(100, 150), figures(100, 150), figures(100, 100), images=0)
    r["prompts"][0].update(parted(tie=True))
    assert causes(r) == ["unexplained"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_parting_is_measured_after_the_common_prefix_and_judged_by_the_dtypes_rounding(tiny_targets, dtype):
    """`parting` against a naive reference: the target's logits over the whole prompt + answer, read at the answer
    token where two answers first differ."""
    import torch

    from extract.capture import TIE_ULPS
    from extract.regenerate import generate
    from extract.target import load_target
    from extract.prompts import TurnPrompt
    from helpers import prompts_of
    from tools.serve_check import parting

    target = load_target(str(tiny_targets / "qwen3"), dtype=dtype, device="cpu")
    prompts = prompts_of(target, max_new_tokens=8)
    text = target.tokenizer.apply_chat_template([{"role": "user", "content": "a dog and a cat"}], tokenize=False,
                                                add_generation_prompt=True)
    batch = prompts.encode([TurnPrompt(text, [])])
    (answer,), _ = generate(target, batch, 8)
    assert len(answer) >= 4
    with torch.no_grad():
        logits = target.model(input_ids=torch.cat([batch["input_ids"], torch.tensor([answer])], 1)).logits[0].float()
    start = batch["input_ids"].shape[1] - 1
    for j in (0, 3):
        row = logits[start + j]
        other = int(row.topk(2).indices[1]) if int(row.argmax()) == answer[j] else int(row.argmax())
        got = parting(target, batch, answer, answer[:j] + [other] + answer[j + 1:])
        gap = float(row[answer[j]] - row[other])
        assert got["at"] == j and got["gap"] == pytest.approx(gap, abs=1e-2 if dtype == "bfloat16" else 1e-4)
        bound = TIE_ULPS * torch.finfo(getattr(torch, dtype)).eps * float(row[answer[j]].abs().clamp_min(1))
        assert got["tie"] == (got["gap"] <= bound)
    assert parting(target, batch, answer, answer) is None
    assert parting(target, batch, answer, answer[:2])["tie"] is False  # one stops where the other goes on


def test_a_dflash2_drafter_is_refused_in_one_line_before_any_engine_starts(tmp_path):
    """vLLM serves DFlash2 only on its V2 runner (Triton): on the CPU build it would refuse it, or serve it as DFlash.
    The check says so before loading anything (the target path here does not even exist)."""
    from dataclasses import replace

    from test_export import DRAFTER, make_run
    from tools.serve_check import run

    ckpt, *_ = make_run(tmp_path, replace(DRAFTER, architecture="dflash2", conv_group_size=8, selector_rank=4,
                                          selector_top_k=3))
    with pytest.raises(ValueError, match="is a DFlash2 drafter: vLLM serves its convolutions and selector only with "
                                         "its V2 model runner, which needs Triton") as e:
        run(str(tmp_path / "no-such-target"), ckpt, prompts=tmp_path / "unused.json")
    assert "\n" not in str(e.value)
