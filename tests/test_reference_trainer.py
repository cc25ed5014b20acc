"""Our DFlash step against the reference trainer (SpecForge's OnlineDFlashModel, installed by `make setup`
without its dependencies): the same weights, batch and anchors give the same loss and gradients."""

import pytest
import torch

pytest.importorskip("specforge.algorithms.common.dflash_family_model",
                    reason="the reference trainer: pip install specforge==0.2.0 --no-deps")

from bench.reference_bench import build, check_equal  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
DIMS = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            intermediate_size=128)


@pytest.mark.parametrize("seq,anchors,block", [(96, 12, 8), (160, 40, 16)])
def test_loss_and_gradients_equal_the_reference_trainer(seq, anchors, block):
    ours, objective, reference, batch = build(seq, anchors, block, vocab=512, dims=DIMS)
    loss_diff, grad_diff = check_equal(ours, objective, reference, batch)
    # fp32 on both sides; only summation order differs.
    assert loss_diff < 1e-5 and grad_diff < 1e-4, (loss_diff, grad_diff)


def test_the_comparison_sees_a_changed_weight():
    ours, objective, reference, batch = build(96, 12, 8, vocab=512, dims=DIMS)
    with torch.no_grad():
        reference.draft_model.layers[0].mlp.up_proj.weight.mul_(1.01)
    loss_diff, grad_diff = check_equal(ours, objective, reference, batch)
    assert loss_diff > 1e-5 or grad_diff > 1e-4
