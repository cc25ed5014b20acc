"""The demo's chain, reduced: a committed learned target (Qwen3-VL; Qwen3.5, whose linear-attention layers keep a
recurrent state), extraction of its task prompts, a DFlash drafter trained from the cache alone, offline replay
and online speculative decoding on held-out prompts.

The point is end to end: the drafter must be accepted (a tau floor) and decoding must stay lossless.
"""

import pytest
from omegaconf import OmegaConf

from cache_schema import CacheReader
from extract.run import run as extract
from helpers import ROOT, extract_config, tiny
from tools.demo import scenes
from tools.demo.pipeline import COMMITTED
from tools.spec_decode import run as spec_decode
from train.checkpoint import resolve_checkpoint
from train.evaluate import evaluate_checkpoint

# Measured on this chain (seed 0, 192 prompts, 240 steps, 12 held-out prompts, one thread): Qwen3-VL tau 2.673
# online and offline (80 steps on 96 prompts: 1.673; 2.786 on 2026-12-06), Qwen3.5 3.123 online and offline. The
# floor leaves a quarter for other kernels and CPUs while still failing a drafter that learned nothing (tau 1.0-1.2
# on this task).
TAU_FLOOR = 2.0

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen3_5"])
def test_drafter_from_the_cache_is_accepted_online_and_decoding_is_lossless(tmp_path, family):
    from train.loop import train

    target_dir, conf = COMMITTED[family]
    model = target_dir / "model"
    layer_ids = list(OmegaConf.load(ROOT / "conf" / "target" / f"{conf}.yaml").layer_ids)  # what `target=conf` takes
    train_shards = scenes.write_task_shards(tmp_path / "shards", "train", 192, samples_per_shard=48)
    heldout_shards = scenes.write_task_shards(tmp_path / "shards", "heldout", 12)
    for out, shards in (("cache", train_shards), ("heldout", heldout_shards)):
        cfg = extract_config(tmp_path / out, shards, model, layer_ids=layer_ids)
        cfg.generation.max_new_tokens = 64
        cfg.generation.batch_size = 16
        extract(cfg)
    cfg = tiny(tmp_path / "cache", tmp_path / "run", "optim.max_steps=240", "optim.lr=3e-3", "eval_every=0",
               "save_every=0", "data.eval_shards=0")
    train(cfg)
    ckpt = resolve_checkpoint(tmp_path / "run")

    offline = evaluate_checkpoint(ckpt, cache=str(tmp_path / "heldout"), shards=",".join(CacheReader(str(tmp_path / "heldout")).shards),
                       out=tmp_path / "eval", progress=False)
    online = spec_decode(str(model), ckpt, shards=",".join(map(str, heldout_shards)), progress=False)
    assert online["lossless"], [p["key"] for p in online["prompts"] if not p["lossless"]]
    assert online["samples"] == 12
    tau_offline = offline["dflash"]["last_turn"]["tau"]
    print(f"learned chain, {family}: tau online {online['tau']:.3f}, offline {tau_offline:.3f}")
    assert online["tau"] >= TAU_FLOOR
    assert abs(online["tau"] - tau_offline) <= 0.05
