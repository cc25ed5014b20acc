"""CUDA-only check (run with `pytest -m gpu` on a GPU machine): compiled flex attention against the dense mask,
forward and backward, under bf16 autocast as in training."""

import pytest
import torch

from train.attention import build_mask
from train.objective import chunked_logits, make_blocks, sample_anchors, sample_prefix
from test_train_objective import BLOCK, MASK, drafter, make_batch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_compiled_flex_equals_dense_forward_and_backward():
    ids, mask, pos, hidden, lens = make_batch([300, 200], seed=1, pad_to=320)
    ids, mask, pos, hidden, lens = (t.cuda() for t in (ids, mask, pos, hidden, lens))
    sids = torch.tensor([0, 1], device="cuda")
    anchors, keep = sample_anchors(mask, lens, sids, 64, 0, 0)
    prefix = sample_prefix(keep, sids, 0, 0, BLOCK, 0.9, "dflash")
    blocks = make_blocks(ids, pos, mask, lens, anchors, keep, prefix, BLOCK, MASK, 4.0)
    results = {}
    for backend in ("dense", "flex"):
        model = drafter(seed=5, head_dim=64).float().cuda()  # the shapes compiled flex kernels are built for
        m = build_mask(anchors, lens, ids.shape[1], BLOCK, backend)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            h = model(hidden.float(), pos, blocks.ids_BQ, blocks.pos_BQ, m, backend)
            ce = chunked_logits(h, model.lm_head_VH, blocks.labels_BQ, blocks.weights_BQ > 0, 64).ce_BQ
            loss = (ce * blocks.weights_BQ).sum()
        loss.backward()
        results[backend] = (h.detach(), loss.detach(), [p.grad for p in model.parameters()])
    (hd, ld, gd), (hf, lf, gf) = results["dense"], results["flex"]
    # bf16 attention on both sides: agreement to bf16 resolution, not bit equality
    torch.testing.assert_close(hf.float(), hd.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(lf, ld, rtol=1e-2, atol=1e-2)
    for a, b in zip(gf, gd):
        assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.99
