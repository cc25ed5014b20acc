"""Qwen3.5 where it is served: the learned Qwen3.5, its linear-attention heads widened to a size vLLM's CPU kernels
take (tools/demo/linear_heads.py), computed in bf16 on both sides (the CPU build runs Gated DeltaNet in bf16 only).
A drafter trained from its cache is served by unpatched vLLM through the serve check, and stage one regenerates
through the engine. bf16 on two sets of kernels: answers may part where the target's logits tie at that dtype,
which is told apart from a loss by transformers' logit gap there (extract/capture.py's rule)."""

import numpy as np
import pytest
import torch

from cache_schema import CacheReader
from engines import vllm_python
from tools.demo.pipeline import COMMITTED

pytestmark = pytest.mark.skipif(vllm_python() is None, reason="no vLLM interpreter: make setup-vllm")


@pytest.fixture(scope="module")
def qwen35_runs(tmp_path_factory):
    """The widened learned Qwen3.5; its bf16 caches of 96 task prompts (training) and 16 held-out ones, regenerated
    in process; a one-layer drafter trained from the first with the positions vLLM's V1 runner feeds."""
    from omegaconf import OmegaConf

    from extract.run import run as extract
    from helpers import ROOT, extract_config, tiny
    from tools.demo import scenes
    from tools.demo.linear_heads import servable
    from train.loop import train

    tmp = tmp_path_factory.mktemp("qwen35")
    committed, conf = COMMITTED["qwen3_5"]
    target = servable(committed / "model", tmp)
    layer_ids = list(OmegaConf.load(ROOT / "conf" / "target" / f"{conf}.yaml").layer_ids)
    shards = {"cache": scenes.write_task_shards(tmp / "shards", "train", 96, samples_per_shard=48),
              "heldout": scenes.write_task_shards(tmp / "shards", "heldout", 16)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only add synchronisation
    try:
        for name, paths in shards.items():
            cfg = extract_config(tmp / name, paths, target, layer_ids=layer_ids, max_new_tokens=64)
            cfg.target.dtype = "bfloat16"
            cfg.generation.batch_size = 16
            extract(cfg)
        train(tiny(tmp / "cache", tmp / "drafter", "drafter.num_layers=1", "drafter.head_dim=32",
                   "drafter.block_size=4", "drafter.position_source=mrope_axis0", "drafter.rope_theta=10000",
                   "optim.max_steps=240", "optim.lr=3e-3", "eval_every=0", "save_every=0", "data.eval_shards=0"))
    finally:
        torch.set_num_threads(threads)
    return tmp, target, ",".join(map(str, shards["heldout"]))


def test_vllm_serves_a_qwen35_drafter_losslessly_and_accepts_what_our_replay_as_served_predicts(qwen35_runs, tmp_path):
    """The serve check on the hybrid target: the engine runs with prefix caching off (set by the check), its
    speculative answers equal its greedy ones and transformers' up to ties, and its acceptance counters equal our
    replay fed as the engine feeds the drafter, within the check's tie share."""
    from tools.serve_check import agrees, lossless, run

    tmp, target, heldout = qwen35_runs
    report = run(str(target), tmp / "drafter", shards=heldout, out=tmp_path, progress=False)
    assert report["samples"] == 16 and report["dtype"] == "bfloat16"
    assert report["engine_settings"] == {"dtype": "bfloat16", "enable_prefix_caching": False}
    for pair in ("engine_vs_its_greedy", "engine_vs_transformers", "ours_vs_transformers"):
        assert lossless(report, pair), (pair, [p["partings"] for p in report["prompts"]])
    assert agrees(report["engine"], report["ours_as_served"]), (report["engine"], report["ours_as_served"])
    assert report["engine"]["accepted"] > 0.2 * report["engine"]["drafts"]  # a comparison of zeros proves nothing


def test_stage_one_through_the_engine_on_qwen35_is_the_in_process_cache_up_to_ties(qwen35_runs, tmp_path):
    """`generation.engine=vllm` on the held-out prompts: every answer the engine wrote is the target's greedy choice
    or parts from it at a tie, every conversation whose answers equal in-process regeneration's is cached with the
    same ids, masks and positions, and every layer captured is alive (vLLM #46301 gave hybrid targets all-zero
    states): finite, no sample's layer all zero, and the audit flags none."""
    from cache_schema.audit import audit
    from extract.run import run as extract
    from helpers import ROOT
    from test_vllm import engine_extract_config

    tmp, target, heldout = qwen35_runs
    cfg = engine_extract_config(ROOT, tmp_path / "cache", heldout, 8, "target.dtype=bfloat16",
                                target="learned_qwen35")
    cfg.target.path = str(target)
    turns = extract(cfg)["turns"]
    assert turns["engine_answered"] == 16 and turns["engine_disagreements"] == turns["engine_disagreement_ties"]
    want, got = CacheReader(str(tmp / "heldout")), CacheReader(str(tmp_path / "cache"))
    assert len(got) == len(want) == 16
    same = 0
    for i in range(len(want)):
        x, y = want[i], got[i]
        assert x.key == y.key
        if np.array_equal(x.input_ids, y.input_ids):
            same += 1
            assert np.array_equal(x.loss_mask, y.loss_mask) and np.array_equal(x.position_ids, y.position_ids)
        hidden = y.hidden_TLH.float()
        assert torch.isfinite(hidden).all() and (hidden.abs().amax(dim=(0, 2)) > 0).all(), f"{y.key}: a dead layer"
    assert same >= 12, f"only {same} of 16 conversations answered as in process"
    assert audit(got)["flagged"] == {}
