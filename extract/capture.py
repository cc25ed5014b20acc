"""One teacher-forced forward per final sequence, capturing the chosen layers' outputs into a cache Sample; for
answers a serving engine wrote, the same forward checks each token against the target's own greedy choice."""

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cache_schema import Sample
from extract.formats import SkipSample
from extract.regenerate import Sequence
from extract.spans import loss_mask
from extract.target import Target


@dataclass
class Agreement:
    """An engine's answer against the target's teacher-forced greedy choice at every one of its tokens."""

    disagrees: bool = False
    position: int | None = None  # first answer token the target would not have chosen
    gap: float | None = None  # by how much (logits) the target prefers its own token there
    tie: bool = False  # the gap lies within the rounding of the target's dtype at that logit's size


# A gap within this many units of the dtype's precision at the logits' magnitude is a tie: another kernel (the
# engine's), summing in another order, may resolve it either way.
TIE_ULPS = 8


def agreement(target: Target, final_TH: torch.Tensor, ids: torch.Tensor, span: tuple[int, int]) -> Agreement:
    start, end = span
    head = target.head_tensors()["lm_head"]
    logits = (final_TH[start - 1:end - 1] @ head.T).float()
    if target.suppressed_ids:
        logits[:, target.suppressed_ids] = float("-inf")
    chosen, written = logits.argmax(-1), ids[start:end]
    wrong = (chosen != written).nonzero()
    if not len(wrong):
        return Agreement()
    j = int(wrong[0])
    gap, tie = tie_gap(logits[j], int(chosen[j]), int(written[j]), final_TH.dtype)
    return Agreement(True, j, gap, tie)


def tie_gap(logits_V: torch.Tensor, chosen: int, other: int, dtype: torch.dtype) -> tuple[float, bool]:
    """By how much one row of logits prefers `chosen` to `other`, and whether that lies within the rounding of a
    target computed in `dtype` (TIE_ULPS units of its precision at the chosen logit's magnitude)."""
    gap = float(logits_V[chosen] - logits_V[other])
    precision = torch.finfo(dtype).eps * float(logits_V[chosen].abs().clamp_min(1))
    return gap, gap <= TIE_ULPS * precision


@contextmanager
def final_states(target: Target):
    """The final norm's output (what the LM head reads) of each forward."""
    out = {}
    handle = target.decoder.norm.register_forward_hook(lambda _m, _a, output: out.update(states=output))
    try:
        yield out
    finally:
        handle.remove()


@torch.no_grad()
def capture(target: Target, seq: Sequence, layer_ids: list[int]) -> tuple[Sample, Agreement | None]:
    """The cache sample of `seq`, and for an engine's answers their agreement with the target."""
    inputs = {k: v.to(target.device) if torch.is_tensor(v) else v for k, v in seq.inputs.items()}
    with target.capture(layer_ids) as captured, final_states(target) as final:
        target.model(**inputs, use_cache=False, logits_to_keep=1)
    sample = sample_of(target, seq, inputs, torch.stack([captured[i][0] for i in layer_ids], dim=1), layer_ids)
    checked = agreement(target, final["states"][0], inputs["input_ids"][0], seq.spans[-1]) \
        if seq.engine_answered else None
    return sample, checked


def engine_sample(target: Target, seq: Sequence, ids_T: torch.Tensor, hidden_TLH: torch.Tensor,
                  layer_ids: list[int]) -> Sample:
    """The cache sample of `seq` from the states a serving engine captured over `ids_T`, the sequence as it ran it:
    a skip unless those are the sequence's ids (its processor expanded the images otherwise)."""
    ids = seq.inputs["input_ids"][0]
    if ids_T.shape != ids.shape or not torch.equal(ids_T.to(ids.dtype), ids):
        raise SkipSample("engine_tokens_differ", f"the engine ran {ids_T.shape[0]} tokens, other than the "
                                                 f"{ids.shape[0]} of the sequence (its image expansion?)")
    return sample_of(target, seq, seq.inputs, hidden_TLH, layer_ids)


def sample_of(target: Target, seq: Sequence, inputs: dict, hidden_TLH: torch.Tensor, layer_ids: list[int]) -> Sample:
    """The cache sample of `seq` from its layers' states [T, L, H]: ids, loss mask, the target's positions, counts."""
    finite_L = torch.isfinite(hidden_TLH).all(dim=2).all(dim=0)  # one reduction, one transfer below
    if not bool(finite_L.all()):
        bad = [layer_ids[i] for i in (~finite_L).nonzero().flatten().tolist()]
        raise SkipSample("non_finite_hidden", f"target layers {bad} gave inf or NaN hidden states")
    positions = target.position_ids(inputs)[:, 0, :]
    ids = inputs["input_ids"][0]
    image_ids = target.token_ids(target.traits.chat.expanded)
    n_image = int(sum((ids == v).sum() for v in image_ids)) if image_ids else 0
    # Every count describes the cached sequence; dropped_turns says what of the conversation it left out.
    meta = {"source": seq.conv.source, "num_images": seq.images, "num_image_tokens": n_image,
            "assistant_turns": seq.turns, "truncated_turns": seq.truncated_turns,
            "dropped_turns": seq.dropped_turns, "generated_tokens": seq.generated_tokens}
    return Sample(key=seq.conv.key, input_ids=ids.cpu().numpy().astype(np.int32),
                  loss_mask=loss_mask(ids.shape[0], seq.spans),
                  position_ids=positions.cpu().numpy().astype(np.int32),
                  hidden_TLH=hidden_TLH.to(torch.bfloat16).cpu(), meta=meta)
