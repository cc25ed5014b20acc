"""The serve check's diagnosis (`tools.serve_check.diagnose`) on reports made up here: each cause is named exactly
when what it explains was measured. The engine itself is in tests/test_vllm.py."""

import pytest

from tools.serve_check import diagnose


def figures(drafts: int, accepted: int, overwritten: int = 0) -> dict:
    return {"drafts": drafts, "accepted": accepted, "acceptance_length": 1 + accepted / drafts,
            "overwritten_context": overwritten}


def report(ours, as_served, engine, images: int = 1, trained: str = "sequential", layers: int = 1) -> dict:
    prompt = {"key": "p0", "images": images, "reference": [1, 2], "engine_greedy": [1, 2],
              "engine_speculative": [1, 2]}
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


def test_engine_greedy_output_and_verification_come_first():
    r = report(figures(100, 150), figures(100, 150), figures(100, 100), images=0)
    r["prompts"][0].update(engine_greedy=[1, 3], engine_speculative=[1, 4])
    assert causes(r)[:2] == ["prompts or target differ", "engine verification"]


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
