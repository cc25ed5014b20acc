"""Reference speculative decoding: cached drafting equals the masked training forward, every output equals the
target's greedy `generate` (single image, multi-image, multi-turn, text-only; D2SD on and off; Qwen3-VL and the
linear-attention Qwen3.5), every accept length cuts the target's cache back exactly, and the online tau equals
the offline replay of the same prompts' cache."""

import dataclasses

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from helpers import seeded
from cache_schema import CacheReader
from extract.families import FAMILIES
from extract.formats import SkipSample
from extract.config import ExtractConfig, GenerationConfig, InputConfig, TargetConfig
from extract.prompts import GenerationSettings, Prompts
from extract.regenerate import generate, last_turn_prompt
from extract.run import run as extract
from extract.target import load_target
from tools.fixtures.oracle_drafts import OracleDecoder
from tools.fixtures.tiny_targets import build_target
from tools.spec_decode import run, shard_conversations
from tools.speculative_decoder import SpeculativeDecoder, may_beat, one_slot_per_position
from train.attention import build_mask
from train.checkpoint import load_drafter
from train.config import DrafterConfig
from train.data import CacheDataset
from train.model import ContextCache, Drafter
from train.replay import GreedyDrafter, replay_records, replay_figures

ROOT = Path(__file__).resolve().parents[1]
MAX_NEW = 24


pytestmark = pytest.mark.usefixtures("one_thread")


def random_drafter(hidden: int, vocab: int, layers: list[int], block: int, mask: int, seed: int) -> Drafter:
    cfg = DrafterConfig(hidden_size=hidden, vocab_size=vocab, target_layer_ids=layers, num_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=8, intermediate_size=48,
                        block_size=block, mask_token_id=mask, rope_theta=10000.0)
    g = torch.Generator().manual_seed(seed + 1)
    with seeded(seed):
        return Drafter(cfg, torch.randn(vocab, hidden, generator=g), torch.randn(vocab, hidden, generator=g)).eval()


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_drafting_equals_the_masked_forward(seed):
    """Context appended in pieces, then blocks drafted (two rows sharing the context, as D2SD branches do) equal
    `forward` over the whole context with the training mask, at non-contiguous positions (M-RoPE axis 0)."""
    B, T, anchor = 5, 14, 9
    model = random_drafter(32, 50, [1, 2, 3], B, 49, seed).double()
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, T, 3, 32, generator=g, dtype=torch.float64)
    pos = torch.cat([torch.arange(4), torch.full((5,), 4), torch.arange(5, 10) + 3])[None]  # an image's run
    ids = torch.tensor([[7, 49, 49, 49, 49], [7, 11, 12, 49, 49]])
    block_pos = (pos[0, anchor - 1] + 1 + torch.arange(B))[None].expand(2, -1)
    mask = build_mask(torch.tensor([[anchor]]), torch.tensor([T]), T, B, "dense")
    want = torch.cat([model(hidden, pos, ids[r:r + 1], block_pos[r:r + 1], mask) for r in range(2)])
    cache = ContextCache(len(model.layers))
    for lo, hi in ((0, 1), (1, 6), (6, anchor)):
        model.extend_context(cache, hidden[:, lo:hi], pos[:, lo:hi])
    assert len(cache) == anchor
    torch.testing.assert_close(model.draft(cache, ids, block_pos), want, rtol=1e-12, atol=1e-12)


def slot_buffer_draft(model: Drafter, hidden, pos, ids, block_pos):
    """A drafter step as vLLM's V1 runner computes it, written out naively: every layer's keys and values go into a
    buffer of one slot per position, context tokens in order (a later one overwrites an earlier one at the same
    position) and then the block; attention reads as many slots as there are context tokens and block slots,
    those never written holding zeros."""
    T, B = hidden.shape[1], ids.shape[1]
    ctx, x = model.context(hidden), torch.nn.functional.embedding(ids, model.embed_VH).to(hidden.dtype)
    for layer in model.layers:
        attn = layer.self_attn
        k_ctx, v_ctx = attn.context_kv(ctx, pos, model.rope)
        h = layer.input_layernorm(x)
        q = model.rope(attn.q_norm(attn._heads(attn.q_proj(h), attn.h)), block_pos)
        k_blk = model.rope(attn.k_norm(attn._heads(attn.k_proj(h), attn.kv)), block_pos)
        v_blk = attn._heads(attn.v_proj(h), attn.kv)
        keys = torch.zeros(ids.shape[0], attn.kv, T + B, attn.d, dtype=hidden.dtype)
        values = torch.zeros_like(keys)
        for t in range(T):
            keys[:, :, pos[0, t]], values[:, :, pos[0, t]] = k_ctx[0, :, t], v_ctx[0, :, t]
        for j in range(B):
            keys[:, :, block_pos[0, j]], values[:, :, block_pos[0, j]] = k_blk[:, :, j], v_blk[:, :, j]
        groups = attn.h // attn.kv
        keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
        weights = torch.softmax(q @ keys.transpose(-1, -2) / attn.d ** 0.5, dim=-1)
        x = x + attn.o_proj((weights @ values).transpose(1, 2).flatten(2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return model.norm(x)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_slot_per_position_drafts_as_the_slot_buffer(seed):
    """The as-served model of vLLM's V1 runner (`one_slot_per_position`): the tokens of two images share a
    position each; context appended in pieces, rows zeroed where a slot is overwritten, drafts as the naive slot
    buffer. Without the zeroing it does not (the reference is not the plain cached draft)."""
    B = 4
    model = random_drafter(32, 50, [1, 2, 3], B, 49, seed).double()
    g = torch.Generator().manual_seed(seed)
    pos = torch.cat([torch.arange(3), torch.full((4,), 3), torch.arange(5, 8), torch.full((6,), 8),
                     torch.arange(11, 14)])[None]
    hidden = torch.randn(1, pos.shape[1], 3, 32, generator=g, dtype=torch.float64)
    ids = torch.tensor([[7, 49, 49, 49], [7, 11, 49, 49]])
    block_pos = (pos[0, -1] + 1 + torch.arange(B))[None].expand(2, -1)
    want = slot_buffer_draft(model, hidden, pos, ids, block_pos)
    drafts = {}
    for shared in (True, False):
        cache = ContextCache(len(model.layers))
        for lo, hi in ((0, 7), (7, 16), (16, pos.shape[1])):  # pieces end on text, as the decoder's do
            rows = one_slot_per_position(hidden[:, lo:hi], pos[:, lo:hi])[0] if shared else hidden[:, lo:hi]
            model.extend_context(cache, rows, pos[:, lo:hi])
        drafts[shared] = model.draft(cache, ids, block_pos)
    torch.testing.assert_close(drafts[True], want, rtol=1e-12, atol=1e-12)
    assert (drafts[False] - want).abs().max() > 1e-3, (drafts[False] - want).abs().max()


# DFlash2 on the tiny targets (hidden 64), trained with D-PACE.
DFLASH2 = ("drafter.architecture=dflash2", "drafter.conv_group_size=16", "drafter.selector_rank=16",
           "drafter.selector_top_k=8", "objective.weighting=dpace")


def train_drafter(cache: Path, run_dir: Path, mode: str, steps: int, *extra: str) -> Path:
    from train.loop import train

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["setup=tiny", f"data.cache={cache}", f"objective.mode={mode}",
                                          f"optim.max_steps={steps}", "optim.lr=2e-2", "objective.num_anchors=32",
                                          "data.eval_shards=0", "eval_every=0", "save_every=0", "progress=false",
                                          f"log_every={steps}", *extra])
    cfg.run_dir = str(run_dir)
    train(OmegaConf.to_object(cfg))
    return run_dir / "checkpoints" / f"step-{steps:08d}"


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen3_5"])
def trained(request, tmp_path_factory, tiny_targets, demo_shards):
    """A cache of one demo shard (single image, multi-image, multi-turn, text-only) extracted by a tiny target
    (Qwen3-VL; Qwen3.5, whose linear-attention layers keep a recurrent state), and a DFlash and a VP drafter
    trained on it, then the same two as DFlash2 drafters."""
    tmp = tmp_path_factory.mktemp("spec")
    shard = str(demo_shards[0])
    extract(ExtractConfig(out=str(tmp / "cache"), target=TargetConfig(
        path=str(tiny_targets / request.param), dtype="float32", device="cpu", layer_ids=[2, 4, 5]),
        data=InputConfig(shards=shard), generation=GenerationConfig(max_new_tokens=MAX_NEW, batch_size=8),
        progress=False))
    return (tmp / "cache", shard, train_drafter(tmp / "cache", tmp / "dflash", "dflash", 60),
            train_drafter(tmp / "cache", tmp / "vp", "vp", 20), tiny_targets / request.param,
            train_drafter(tmp / "cache", tmp / "dflash2", "dflash", 60, *DFLASH2),
            train_drafter(tmp / "cache", tmp / "vp2", "vp", 20, *DFLASH2))


def offline_last_turn(cache: Path, ckpt: Path, vp: Path | None, keys: set[str]) -> dict:
    """The replay's last-turn figures over the cached samples `keys` (those decoded online)."""
    reader = CacheReader(str(cache))
    head = reader.head_tensors()
    drafters = [load_drafter(p, head["embed_tokens"], head["lm_head"]) for p in [ckpt] + ([vp] if vp else [])]
    dataset = CacheDataset(reader, reader.shards, drafters[0].drafter.position_source)
    draftings = [GreedyDrafter.from_checkpoint(d) for d in drafters]
    records = [r for r in replay_records(dataset, range(len(dataset)), draftings[0], draftings[1] if vp else None,
                                         k=4) if r["key"] in keys]
    assert len(records) == len(keys)
    return replay_figures(records, drafters[0].drafter.block_size, "d2sd" if vp else "dflash")["last_turn"]


@pytest.mark.parametrize("arch", ["dflash", "dflash2"])
@pytest.mark.parametrize("branches", [False, True], ids=["alone", "d2sd"])
def test_online_equals_generate_and_the_offline_replay(trained, tiny_targets, tmp_path, branches, arch):
    """DFlash (DFlash2: the selector's path) alone, and D2SD with the barely trained VP drafter first and the other
    branching from its likely rejections (so branches win and are verified: the path a well-trained pair takes
    less often)."""
    cache, shard, ckpt, vp, target, ckpt2, vp2 = trained
    if arch == "dflash2":
        ckpt, vp = ckpt2, vp2
    first, branch = (vp, ckpt) if branches else (ckpt, None)
    report = run(str(target), first, shards=shard, vp=branch, out=tmp_path, progress=False)
    rows = report["prompts"]
    assert {r["images"] for r in rows} == {0, 1, 2}  # text-only, single and multi-image
    # The tiny Qwen3.5 writes to the token limit, so extraction cut its multi-turn conversations after turn one.
    assert len(rows) + report["skipped"].get("history_truncated", 0) == 8
    assert [r["key"] for r in rows if not r["lossless"]] == []
    assert report["lossless"] and json.loads((tmp_path / "spec_decode.json").read_text())["lossless"]
    assert max(a for r in rows for a in r["accepted"]) >= 2  # drafts were accepted
    if branches:
        assert report["target_forwards_per_cycle"] > 1  # some branches were sent to the target
    # Cached samples whose later turns were cut have no last-turn prompt online; the replay skips them too.
    offline = offline_last_turn(cache, first, branch, {r["key"] for r in rows})
    # Measured: online and offline agree exactly here, for both (gap 0.000; tau 3.333 over 15 cycles, identical
    # histograms of a); block forwards and extraction's one teacher-forced forward may still round a hidden
    # state to another bf16 word.
    assert offline["cycles"] == report["cycles"]
    assert abs(report["tau"] - offline["tau"]) <= 0.05


def test_text_target_with_random_drafters_is_lossless(tiny_targets, demo_shards):
    target = load_target(str(tiny_targets / "qwen3"), dtype="float32", device="cpu")
    head = target.head_tensors()
    V, H = head["lm_head"].shape
    layers, block, mask = [1, 3, 4], 6, V - 1
    drafting = [GreedyDrafter.of(random_drafter(H, V, layers, block, mask, s), head["lm_head"], block, mask)
                for s in (0, 1)]
    renderer = Prompts(target, GenerationSettings(max_new_tokens=MAX_NEW))
    prompts = [last_turn_prompt(renderer, c) for c in list(shard_conversations(str(demo_shards[1])))[:4]]
    for vp in (None, drafting[1]):
        spec = SpeculativeDecoder(target, drafting[0], layers, "sequential", "fp8_e4m3", vp=vp, k=3)
        for batch in prompts:
            (reference,), _ = generate(target, batch, MAX_NEW)
            out = spec.decode(batch, MAX_NEW)
            assert out.tokens == reference
            assert sum(out.committed) == len(reference) - 1 and len(out.accepted) == len(out.committed)


def test_prompts_file_with_an_image_and_a_bare_question(trained, tmp_path):
    cache, shard, ckpt, vp, target, *_ = trained
    Image.new("RGB", (48, 40), (200, 30, 90)).save(tmp_path / "a.png")
    (tmp_path / "prompts.json").write_text(json.dumps([
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is here?"}]}],
         "images": ["a.png"]},
        {"conversations": [{"from": "human", "value": "Tell me a story."}]}]))
    report = run(str(target), ckpt, prompts=tmp_path / "prompts.json", vp=vp, max_new_tokens=8,
                 progress=False)
    assert report["lossless"] and [r["images"] for r in report["prompts"]] == [1, 0]
    assert all(r["generated"] <= 8 for r in report["prompts"])


def test_refusals_name_the_problem(trained, tiny_targets, tmp_path):
    cache, shard, ckpt, vp, target, *_ = trained
    with pytest.raises(ValueError, match=f"model_type '{target.name}' in its cache, 'qwen3' loaded"):
        run(str(tiny_targets / "qwen3"), ckpt, shards=shard, progress=False)
    with pytest.raises(ValueError, match="exactly one of --shards and --prompts"):
        run(str(target), ckpt, progress=False)


def oracle_decoder(path: Path, block: int) -> OracleDecoder:
    target = load_target(str(path), dtype="float32", device="cpu")
    head = target.head_tensors()
    V, H = head["lm_head"].shape
    drafter = GreedyDrafter.of(random_drafter(H, V, [1], block, V - 1, 0), head["lm_head"], block, V - 1)
    return OracleDecoder(target, drafter, [1], "sequential", "bf16")


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen3"])
def test_every_accept_length_cuts_the_target_cache_back_exactly(tiny_targets, demo_shards, tmp_path, family):
    """Drafts that are the target's own answer with one slot per block made wrong (or none), at random: each
    accept length 0..B-1 occurs, so the cache is cut back by every amount, a whole block accepted included, and
    the output still equals `generate`. For Qwen3.5 the cut returns the linear-attention layers to their recorded
    state after the last accepted token; without it the next verification would read the rejected tokens."""
    block, max_new = 4, 40
    # The fixture's tiny MoE answers every prompt in 3 tokens; without the end-of-turn boost it writes on.
    path = build_target(family, tmp_path, end_scale=0.0) if family == "qwen3_5_moe" else tiny_targets / family
    spec = oracle_decoder(path, block)
    renderer = Prompts(spec.target, GenerationSettings(max_new_tokens=max_new))
    seen = set()
    for i, conv in enumerate(shard_conversations(",".join(map(str, demo_shards)))):
        try:
            batch = last_turn_prompt(renderer, conv)
        except SkipSample:  # an earlier turn hit max_new
            continue
        (reference,), _ = generate(spec.target, batch, max_new)
        out = spec.decode_towards(batch, reference, max_new, seed=i)
        assert out.tokens == reference, conv.key
        seen |= set(out.matched)
    assert seen == set(range(block))


def test_a_linear_attention_target_whose_record_says_otherwise_is_refused(tiny_targets, demo_shards, monkeypatch):
    spec = oracle_decoder(tiny_targets / "qwen3_5", 4)
    monkeypatch.setitem(FAMILIES, "qwen3_5", dataclasses.replace(FAMILIES["qwen3_5"], recurrent_state=False))
    batch = last_turn_prompt(Prompts(spec.target, GenerationSettings(max_new_tokens=8)),
                             next(iter(shard_conversations(str(demo_shards[1])))))
    with pytest.raises(ValueError, match=r"linear-attention layers \[0, 1, 2, 4, 5, 6\].*recurrent_state=False"):
        spec.decode(batch, 8)


def test_a_branch_is_verified_only_when_it_can_beat_the_best():
    greedy = torch.tensor([5, 6, 7, 8, 9])  # the target's tokens after each slot of a draft that matched a = 2
    assert may_beat(torch.tensor([5, 6, 7, 1]), 2, greedy)  # matches through the rejected slot: a >= 3
    assert not may_beat(torch.tensor([5, 6, 4, 8]), 2, greedy)  # rejected where the draft was
    assert not may_beat(torch.tensor([5, 3, 7, 8]), 2, greedy)  # rejected earlier
    assert not may_beat(torch.tensor([5, 6, 7, 8]), 4, greedy)  # the draft was accepted whole


@pytest.mark.parametrize("source", ["sequential", "mrope_axis0"])
def test_positions_after_images_continue_as_in_the_whole_sequence(tiny_targets, demo_shards, source):
    """The target's positions for verified blocks and the drafter's positions both equal what the whole
    sequence (prompt with two images, then the answer) gets from the model's own get_rope_index, which is what
    extraction caches and training reads."""
    target = load_target(str(tiny_targets / "qwen3_vl"), dtype="float32", device="cpu")
    head = target.head_tensors()
    V, H = head["lm_head"].shape
    drafter = GreedyDrafter.of(random_drafter(H, V, [2, 4, 5], 4, V - 1, 0), head["lm_head"], 4, V - 1)
    spec = SpeculativeDecoder(target, drafter, [2, 4, 5], source, "bf16")
    conv = next(c for c in shard_conversations(str(demo_shards[0])) if len(c.images) == 2)
    batch = last_turn_prompt(Prompts(target, GenerationSettings(max_new_tokens=MAX_NEW)), conv)
    P, answer = batch["input_ids"].shape[1], torch.arange(10, 22)[None]
    whole = {**batch, "input_ids": torch.cat([batch["input_ids"], answer], 1),
             "attention_mask": torch.ones(1, P + 12, dtype=torch.long),
             "mm_token_type_ids": torch.cat([batch["mm_token_type_ids"], torch.zeros_like(answer)], 1)}
    want = target.position_ids(whole)[:, 0]  # [3, P + 12]
    delta = int(target.position_ids(batch).max()) + 1 - P
    assert delta < 0  # the images take fewer positions than tokens: a plain index would be wrong
    got = spec.step_inputs(answer[0, 4:].tolist(), P + 4, delta)["position_ids"]
    torch.testing.assert_close(got[1:, 0], want[:, P + 4:])  # M-RoPE axes, as generate feeds them
    torch.testing.assert_close(got[0, 0], torch.arange(P + 4, P + 12))  # the text (cache) positions
    drafter_pos = spec.drafter_positions(0, P + 12, want[0, :P], delta)[0]
    torch.testing.assert_close(drafter_pos, want[0] if source == "mrope_axis0" else torch.arange(P + 12))
