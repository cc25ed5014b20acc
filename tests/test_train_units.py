"""The training modules where their behaviour is decided, each against a naive statement of it: the schedule, the
held-out sets, the drafter resolved from a cache, the export layouts read back."""

import math

import pytest

from cache_schema import CacheReader
from helpers import compose_train, counting_cache, seeded
from train.caches import open_caches, split
from train.config import DrafterConfig
from train.data import CacheDataset
from train.drafter_from_cache import resolve_drafter
from train.export_formats import FORMATS
from train.heldout import held_out, replayed_tau
from train.model import Drafter
from train.replay import GreedyDrafter
from train.schedule import Schedule, plan, rank_batches


def test_learning_rate_warms_up_linearly_then_follows_the_cosine_to_its_floor():
    factor = Schedule(total_steps=110, warmup_steps=10, min_lr_ratio=0.1, batches_per_epoch=[5]).lr_lambda()
    assert [factor(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    for step in (10, 35, 60, 85, 110, 500):
        progress = min(1.0, (step - 10) / 100)
        assert factor(step) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    assert factor(10) == pytest.approx(1.0) and factor(110) == pytest.approx(0.1)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return counting_cache(tmp_path_factory.mktemp("units"))


def config(cache, *overrides):
    return compose_train("setup=tiny", f"data.cache={cache}", "drafter.mask_token_id=63",
                         "data.max_tokens_per_batch=128", *overrides)


def test_ranks_take_disjoint_equal_shares_and_epochs_decide_the_length(cache):
    cfg = config(cache, "optim.epochs=3", "optim.warmup_ratio=0.1", "data.eval_shards=0")
    sources = cfg.data.sources()
    train_set, _ = split(sources, open_caches(sources), 0, "sequential")
    shares = [rank_batches(train_set, cfg, 0, r, 2) for r in range(2)]
    assert len(shares[0]) == len(shares[1]) >= 1
    assert not {i for b in shares[0] for i in b} & {i for b in shares[1] for i in b}
    schedule = plan(train_set, cfg, 2)
    assert schedule.total_steps == sum(schedule.batches_per_epoch) == 3 * len(shares[0])
    assert schedule.warmup_steps == math.ceil(0.1 * schedule.total_steps)


def test_held_out_sets_replay_their_first_samples_and_a_drafter_is_resolved_from_the_cache(cache):
    cfg = config(cache, "eval_replay_samples=2", "eval_batches=1")
    reader = CacheReader(cache)
    drafter = resolve_drafter(cfg, reader)
    assert (drafter.hidden_size, drafter.vocab_size, drafter.target_layer_ids) == (32, 64, [1, 3, 5])
    assert drafter.mask_token_id == 63
    sets = held_out([("c", CacheDataset(reader, reader.shards[-1:], "sequential"))], cfg)
    assert [(s.name, list(s.replayed), len(s.batches)) for s in sets] == [("c", [0, 1], 1)]
    with seeded(0):
        model = Drafter(drafter, *(reader.head_tensors()[k] for k in ("embed_tokens", "lm_head")))
    drafting = GreedyDrafter.of(model, model.lm_head_VH, drafter.block_size, drafter.mask_token_id)
    row = replayed_tau(sets, drafting, "eval/tau_replay", per_cache=True)
    assert set(row) == {"eval/tau_replay", "eval/tau_replay/c"} and row["eval/tau_replay"] >= 1
    sets[0].replayed = range(0)
    assert replayed_tau(sets, drafting, "eval/tau_replay", per_cache=False) == {}


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize("architecture", ["dflash", "dflash2"])
def test_each_export_layout_reads_back_what_it_writes(fmt, architecture):
    from helpers import make_manifest

    d = DrafterConfig(hidden_size=32, vocab_size=300, target_layer_ids=[1, 3, 5], num_layers=2, head_dim=8,
                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, block_size=4,
                      mask_token_id=299, architecture=architecture, conv_group_size=8, selector_rank=4,
                      selector_top_k=3)
    layout = FORMATS[fmt]
    config = layout.config(d, make_manifest(), 300, "float32", {})
    assert layout.is_it(config) and not any(other.is_it(config) for name, other in FORMATS.items() if name != fmt)
    layer, layer_ids, mask_id, v2 = layout.read(config)
    assert (layer["hidden_size"], layer["num_hidden_layers"], layer_ids, mask_id) == (32, 2, [1, 3, 5], 299)
    assert v2.get("architecture", "dflash") == architecture
    if architecture == "dflash2":
        assert (v2["conv_group_size"], v2["selector_rank"], v2["selector_top_k"]) == (8, 4, 3)
