"""Our training step side by side with the reference DFlash trainer (SpecForge's `OnlineDFlashModel`) on CPU:
the same weights, the same synthetic batch, the same anchors for the equality check, dense (SDPA) attention.

    pip install specforge==0.2.0 --no-deps     # pure Python; its DFlash modules need only torch + transformers
    python bench/reference_bench.py [--steps 6]

Checks first that both compute the same loss and gradients from the same anchors (tolerance printed), then
times forward + backward + clip + AdamW step, alternating the two trainers step by step so that load on a
shared machine hits both alike, each drawing its own anchors as it would in training. Prints median step
times and their ratio (ours / reference: below 1 is faster).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.train_bench import SMALL  # noqa: E402
from train.config import DrafterConfig, ObjectiveConfig  # noqa: E402
from train.export_formats import qwen3_fields  # noqa: E402
from train.model import Drafter  # noqa: E402
from train.objective import Objective  # noqa: E402

LAYERS, GAMMA = 5, 7.0


def reference_modules():
    try:
        from specforge.algorithms.common.dflash_family_model import OnlineDFlashModel
        from specforge.modeling.draft.dflash import DFlashDraftModel
    except ImportError as err:
        raise ImportError(f"the reference trainer is not importable ({err}): "
                          "pip install specforge==0.2.0 --no-deps") from err
    return OnlineDFlashModel, DFlashDraftModel


def build(seq: int, anchors: int, block: int, vocab: int, dims: dict = SMALL):
    """Our drafter (`dims`) and objective, the reference wrapper holding a copy of the same weights, one batch;
    all drawn from seed 0, the caller's global RNG left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _build(seq, anchors, block, vocab, dims)


def _build(seq: int, anchors: int, block: int, vocab: int, dims: dict):
    OnlineDFlashModel, DFlashDraftModel = reference_modules()
    from transformers import Qwen3Config

    cfg = DrafterConfig(vocab_size=vocab, target_layer_ids=list(range(LAYERS)), block_size=block,
                        mask_token_id=vocab - 1, **dims)
    embed, head = ((torch.randn(vocab, cfg.hidden_size) * 0.02).bfloat16() for _ in range(2))
    ours = Drafter(cfg, embed, head)
    objective = Objective(ObjectiveConfig(gamma=GAMMA, num_anchors=anchors, loss_chunk_rows=2048), block_size=block,
                          mask_id=vocab - 1, head_VH=head)

    fields = qwen3_fields(cfg, "float32")
    ref_cfg = Qwen3Config(**{k: v for k, v in fields.items() if k not in ("model_type", "dtype", "torch_dtype")},
                          block_size=block, num_target_layers=LAYERS,
                          dflash_config={"target_layer_ids": list(cfg.target_layer_ids), "mask_token_id": vocab - 1})
    ref_cfg._attn_implementation = "sdpa"
    draft = DFlashDraftModel(ref_cfg)
    missing, unexpected = draft.load_state_dict(ours.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"weights do not map by name: missing {missing}, unexpected {unexpected}")
    # The frozen target tensors in fp32, as our step computes with them on CPU (no autocast).
    ref_head, ref_embed = nn.Linear(cfg.hidden_size, vocab, bias=False), nn.Embedding(vocab, cfg.hidden_size)
    ref_head.weight.data, ref_embed.weight.data = head.float(), embed.float()
    ref_head.requires_grad_(False)
    ref_embed.requires_grad_(False)
    reference = OnlineDFlashModel(draft, ref_head, ref_embed, mask_token_id=vocab - 1, block_size=block,
                                  attention_backend="sdpa", num_anchors=anchors, loss_decay_gamma=GAMMA)

    ids = torch.randint(0, vocab - 1, (1, seq))
    mask = torch.rand(1, seq) < 0.7
    batch = {"input_ids": ids, "loss_mask": mask, "positions": torch.arange(seq)[None],
             "hidden": torch.randn(1, seq, LAYERS, cfg.hidden_size).bfloat16(),
             "lengths": torch.tensor([seq]), "sample_ids": torch.tensor([0])}
    return ours, objective, reference, batch


def our_loss(ours, objective, batch, step):
    blocks = objective.blocks(batch, step)
    loss_sum, stats = objective.loss(ours, batch, blocks)
    return loss_sum / stats["weight"].clamp_min(1e-8), blocks


def reference_loss(reference, batch):
    loss, _, _ = reference(batch["input_ids"], batch["hidden"].flatten(2).float(), batch["loss_mask"].float())
    return loss


def check_equal(ours, objective, reference, batch) -> tuple[float, float]:
    """Relative loss difference and the largest relative gradient difference over the drafter's weights, the
    reference fed our anchors for step 0."""
    loss, blocks = our_loss(ours, objective, batch, 0)
    reference._sample_anchor_positions = lambda *a, **k: (blocks.anchors_BN, blocks.keep_BN)
    try:
        ref = reference_loss(reference, batch)
    finally:
        del reference._sample_anchor_positions  # the class's own sampler again
    loss.backward()
    ref.backward()
    ref_params = dict(reference.draft_model.named_parameters())
    grad_diff = max(float((p.grad - ref_params[n].grad).norm() / p.grad.norm().clamp_min(1e-12))
                    for n, p in ours.named_parameters())
    ours.zero_grad(set_to_none=True)
    reference.zero_grad(set_to_none=True)
    return abs((loss - ref).item()) / abs(ref.item()), grad_diff


def timed_steps(ours, objective, reference, batch, steps: int) -> tuple[list[float], list[float]]:
    opts = {"ours": torch.optim.AdamW(ours.parameters(), lr=1e-4),
            "reference": torch.optim.AdamW(reference.draft_model.parameters(), lr=1e-4)}
    models = {"ours": ours, "reference": reference.draft_model}
    times: dict[str, list[float]] = {"ours": [], "reference": []}
    for k in range(steps + 1):  # step 0 warms both up and is not counted
        for name in ("ours", "reference") if k % 2 else ("reference", "ours"):
            t0 = time.perf_counter()
            loss = our_loss(ours, objective, batch, k)[0] if name == "ours" else reference_loss(reference, batch)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(models[name].parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if k:
                times[name].append(time.perf_counter() - t0)
    return times["ours"], times["reference"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    try:
        reference_modules()
    except ImportError as err:
        sys.exit(str(err))
    print(f"torch {torch.__version__}, CPU, {torch.get_num_threads()} threads; drafter {SMALL} x {LAYERS} target "
          "layers; fp32 weights, bf16 cache hidden states and frozen head")
    print("| seq | anchors | block | vocab | loss rel. diff | max grad rel. diff | ours ms | reference ms | "
          "ours / reference |")
    print("|---|---|---|---|---|---|---|---|---|")
    for seq, anchors, block, vocab in ((512, 64, 8, 4096), (2048, 256, 16, 32768), (2048, 512, 16, 32768)):
        ours, objective, reference, batch = build(seq, anchors, block, vocab)
        loss_diff, grad_diff = check_equal(ours, objective, reference, batch)
        mine, theirs = timed_steps(ours, objective, reference, batch, args.steps)
        a, b = statistics.median(mine), statistics.median(theirs)
        print(f"| {seq} | {anchors} | {block} | {vocab} | {loss_diff:.1e} | {grad_diff:.1e} | {1000 * a:.0f} | "
              f"{1000 * b:.0f} | {a / b:.2f} |", flush=True)


if __name__ == "__main__":
    main()
