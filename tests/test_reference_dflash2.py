"""DFlash2 and D-PACE against the public reference, speculators 0.9.0 (`models/dflash2`, `losses/utils.py`),
installed by `make setup` without its dependencies: float64, shared weights and inputs."""

import pytest
import torch

pytest.importorskip("speculators.models.dflash2.model_definitions",
                    reason="the reference: pip install speculators==0.9.0 hs-connectors==0.9.0 --no-deps")

from speculators.losses.utils import dpace_loss_decay  # noqa: E402
from speculators.models.dflash2 import DFlash2DraftModel, DFlash2SpeculatorConfig  # noqa: E402
from speculators.models.dflash2.model_definitions import (CandidateSelector, GroupedDynamicCausalConv,  # noqa: E402
                                                          Qwen3DFlash2DecoderLayer)
from transformers import Qwen3Config  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding  # noqa: E402

from helpers import seeded  # noqa: E402
from test_dflash2 import H, dflash2  # noqa: E402
from test_train_objective import BLOCK, MASK, V, make_batch  # noqa: E402
from train.attention import build_mask  # noqa: E402
from train.config import ObjectiveConfig  # noqa: E402
from train.export_formats import qwen3_fields  # noqa: E402
from train.objective import Objective, dpace_weights  # noqa: E402
from train.replay import GreedyDrafter  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    with seeded(0):
        yield


def reference_config(model) -> Qwen3Config:
    fields = qwen3_fields(model.cfg, "float64")
    cfg = Qwen3Config(**{k: v for k, v in fields.items() if k not in ("model_type", "dtype", "torch_dtype")})
    cfg._attn_implementation = "eager"
    return cfg


def test_convolution_equals_the_reference():
    ours = dflash2().layers[0].mlp_conv
    ref = GroupedDynamicCausalConv(H, block_size=BLOCK, kernel_size=3, group_size=8).double()
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(1, 3 * BLOCK, H, dtype=torch.float64)
    (y, k), (y_ref, k_ref) = ours.prepare(x), ref.prepare(x)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    z = torch.randn_like(x)
    torch.testing.assert_close(ours.finish(z, k), ref.finish(z, k_ref), rtol=1e-12, atol=1e-12)


def test_decoder_layer_equals_the_reference_on_several_blocks():
    """Our layer (convolutions, block-sparse mask) against Qwen3DFlash2DecoderLayer fed the same mask, rotary tables
    and fused context."""
    model = dflash2(seed=3)
    layer = model.layers[1]
    ref = Qwen3DFlash2DecoderLayer(reference_config(model), 1, block_size=BLOCK, conv_kernel_size=3,
                                   conv_group_size=8).double()
    missing, unexpected = ref.load_state_dict(layer.state_dict(), strict=False)
    assert not missing and not unexpected
    T, N = 14, 3
    ctx = torch.randn(1, T, H, dtype=torch.float64)
    x = torch.randn(1, N * BLOCK, H, dtype=torch.float64)
    ctx_pos = torch.arange(T)[None] * 2 + 3
    anchors = torch.tensor([[4, 9, 13]])
    pos = (ctx_pos.gather(1, anchors)[..., None] + torch.arange(BLOCK)).flatten(1)
    mask = build_mask(anchors, torch.tensor([T]), T, BLOCK, "dense")
    ours = layer(x, ctx, pos, ctx_pos, model.rope, mask, "dense")
    rope = Qwen3RotaryEmbedding(reference_config(model))
    cos, sin = rope(x, torch.cat([ctx_pos, pos], 1))
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    theirs = ref(target_hidden=ctx, hidden_states=x, attention_mask=additive, position_embeddings=(cos, sin))
    theirs = theirs[0] if isinstance(theirs, tuple) else theirs
    # Both sides build their rotary tables in fp32 (in another order), the rest is float64: equal to fp32's rounding.
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


def test_selector_scores_and_greedy_path_equal_the_reference():
    model = dflash2(seed=4)
    sel = model.candidate_selector
    ref = CandidateSelector(vocab_size=V, hidden_size=H, rank=6, top_k=5).double()
    ref.load_state_dict(sel.state_dict())
    h = torch.randn(5, BLOCK, H, dtype=torch.float64) * 2
    ids = torch.full((5, BLOCK), MASK)
    ids[:, 0] = torch.tensor([3, 8, 13, 21, 34])
    logits = h[:, 1:] @ model.lm_head_VH.T
    cand = logits.topk(5).indices
    prev = torch.randint(0, V, (5, BLOCK - 1))
    with torch.no_grad():
        ours = logits.gather(-1, cand) + torch.stack(
            [sel.transition(h[:, 1 + k], prev[:, k], cand[:, k]) for k in range(BLOCK - 1)], 1)
        theirs = ref.score_candidates(logits, h[:, 1:], prev, cand)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    # The greedy lattice walk: each slot's best candidate after the previous slot's choice, the anchor first.
    path, walk_prev = [], ids[:, 0]
    with torch.no_grad():
        for k in range(BLOCK - 1):
            scores = ref.score_candidates(logits[:, k], h[:, 1 + k], walk_prev, cand[:, k])
            walk_prev = cand[:, k].gather(-1, scores.argmax(-1, keepdim=True)).squeeze(-1)
            path.append(walk_prev)
    tokens, _ = GreedyDrafter.of(model, model.lm_head_VH, BLOCK, MASK).pick(h, ids, torch.ones(5, dtype=torch.long))
    assert torch.equal(tokens, torch.stack(path, 1))


@pytest.mark.parametrize("mode", ["dflash", "vp"])
def test_dpace_weights_and_loss_equal_the_reference_under_each_normaliser(mode):
    """Our D-PACE on a real batch against `dpace_loss_decay` fed the same per-slot cross-entropies and mask; the
    reference divides by supervised slots (our normalizer=slots), ours by default by the summed weights."""
    model = dflash2(seed=5)
    ids, mask, pos, hidden, lens = make_batch([28, 17], seed=11)
    batch = {"input_ids": ids, "loss_mask": mask, "positions": pos, "hidden": hidden.double(), "lengths": lens,
             "sample_ids": torch.tensor([3, 4])}
    figures = {}
    for normalizer in ("weight", "slots"):
        objective = Objective(ObjectiveConfig(mode=mode, weighting="dpace", normalizer=normalizer, num_anchors=7,
                                              selector_alpha=0.0), block_size=BLOCK, mask_id=MASK,
                              head_VH=model.lm_head_VH)
        blocks = objective.blocks(batch, step=1)
        loss_sum, stats = objective.loss(model, batch, blocks)
        figures[normalizer] = float(loss_sum.detach() / stats["weight"])
    with torch.no_grad():
        h = model(batch["hidden"], pos, blocks.ids_BQ, blocks.pos_BQ,
                  build_mask(blocks.anchors_BN, lens, ids.shape[1], BLOCK, "dense"))
    scored = (blocks.weights_BQ > 0).double()
    ce = torch.nn.functional.cross_entropy((h @ model.lm_head_VH.T).flatten(0, 1), blocks.labels_BQ.flatten(),
                                           reduction="none").view_as(scored) * scored
    B, N = blocks.anchors_BN.shape
    ref_w = torch.cat([dpace_loss_decay(None, loss_mask=scored[b:b + 1], block_size=BLOCK, dpace_alpha=0.5,
                                        elementwise_loss=ce[b:b + 1]) for b in range(B)])
    ours_w = dpace_weights(ce.view(B, N, BLOCK), scored.bool().view(B, N, BLOCK), 0.5).flatten(1)
    torch.testing.assert_close(ours_w, ref_w.to(ours_w.dtype), rtol=1e-6, atol=1e-9)  # the reference is fp32
    ref_sum = float((ref_w.double() * ce).sum())
    assert figures["slots"] == pytest.approx(ref_sum / float(scored.sum()), rel=1e-5)
    assert figures["weight"] == pytest.approx(ref_sum / float(ref_w.sum()), rel=1e-5)


def test_our_drafter_loads_by_name_into_the_reference_model():
    model = dflash2(seed=6)
    cfg = DFlash2SpeculatorConfig(transformer_layer_config=reference_config(model), draft_vocab_size=V,
                                  block_size=BLOCK, aux_hidden_state_layer_ids=list(model.cfg.target_layer_ids),
                                  mask_token_id=MASK, conv_kernel_size=3, conv_group_size=8, selector_rank=6,
                                  selector_top_k=5)
    ref = DFlash2DraftModel(cfg).double()
    missing, unexpected = ref.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected
    # What the reference owns beside the drafter: the verifier's embedding, heads and final norm.
    assert set(missing) == {"embed_tokens.weight", "lm_head.weight", "verifier_lm_head.weight",
                            "verifier_norm.weight"}
    for name, tensor in model.state_dict().items():
        assert torch.equal(ref.state_dict()[name], tensor), name
