"""DFlash2's two draft-only parts on top of the DFlash backbone (train/model.py).

Grouped dynamic causal convolution, around every attention and MLP sublayer of every layer:

    prepare(x)   after the sublayer's RMSNorm:  delta = kernel_projection(x) -> [.., 2, taps, groups]
                 returns conv(x, base_kernel[0], delta[0]) and keeps delta[1] for finish
    finish(y)    on the sublayer's output, before the residual add: conv(y, base_kernel[1], delta[1])
    conv(x)[i, c] = sum_t [slot(i) >= t] (base[t, c] + delta[i, t, c // group]) * x[i - t, c]

Taps never reach across a block (slot(i) is i's index inside its block). `base_kernel` starts as the identity and
`kernel_projection` at zero, so a fresh convolution is an exact no-op.

Candidate selector, at every slot k >= 1 of a block:

    unary     = softcap(output_multiplier * head(h_k))               the drafter's own logits
    score(c)  = unary[c] + <pred_codebook[prev] * hidden_projection(h_k), succ_codebook[c]>,  c in top-k(unary)

where prev is the token of slot k - 1 (the anchor's for slot 1). Drafting walks the slots greedily, each choice the
next slot's predecessor; training scores the true previous token. Codebooks are indexed by target token id, over
the whole target vocabulary, whatever the draft vocabulary (candidates are mapped to target ids first).
`succ_codebook` starts at zero, so a fresh selector keeps the unary order.
"""

import torch
import torch.nn.functional as F
from torch import nn


class GroupedDynamicConv(nn.Module):
    def __init__(self, hidden: int, block: int, taps: int, group: int):
        super().__init__()
        self.block, self.taps, self.group = block, taps, group
        self.base_kernel = nn.Parameter(torch.zeros(2, taps, hidden))
        self.kernel_projection = nn.Linear(hidden, 2 * taps * (hidden // group), bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.base_kernel.zero_()
            self.base_kernel[:, 0] = 1.0
            self.kernel_projection.weight.zero_()

    def prepare(self, x_BQH: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        delta = self.kernel_projection(x_BQH).unflatten(-1, (2, self.taps, -1))  # [B, Q, 2, taps, groups]
        return self.convolve(x_BQH, self.base_kernel[0], delta[..., 0, :, :]), delta[..., 1, :, :]

    def finish(self, y_BQH: torch.Tensor, delta_BQTG: torch.Tensor) -> torch.Tensor:
        return self.convolve(y_BQH, self.base_kernel[1], delta_BQTG)

    def convolve(self, x_BQH: torch.Tensor, base_TH: torch.Tensor, delta_BQTG: torch.Tensor) -> torch.Tensor:
        """Causal taps along the slots of each block; rows of x hold whole blocks back to back."""
        slot = torch.arange(x_BQH.shape[1], device=x_BQH.device) % self.block
        out = torch.zeros_like(x_BQH)
        for t in range(self.taps):
            shifted = F.pad(x_BQH, (0, 0, t, 0))[:, :x_BQH.shape[1]]  # x[i - t], zeros before the row
            coef = base_TH[t].to(x_BQH.dtype) + delta_BQTG[..., t, :].repeat_interleave(self.group, dim=-1)
            out = out + shifted * coef * (slot >= t)[:, None].to(x_BQH.dtype)
        return out


class CandidateSelector(nn.Module):
    def __init__(self, vocab: int, hidden: int, rank: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.predecessor_codebook = nn.Parameter(torch.zeros(vocab, rank))
        self.successor_codebook = nn.Parameter(torch.zeros(vocab, rank))
        self.hidden_projection = nn.Linear(hidden, rank, bias=False)

    def reset_parameters(self, std: float) -> None:
        with torch.no_grad():
            nn.init.normal_(self.predecessor_codebook, std=std)
            nn.init.normal_(self.hidden_projection.weight, std=std)
            self.successor_codebook.zero_()

    def transition(self, h_RH: torch.Tensor, prev_R: torch.Tensor, cand_RK: torch.Tensor) -> torch.Tensor:
        """The low-rank score [R, K] of each candidate (target ids) after predecessor `prev_R` (target ids)."""
        context = self.predecessor_codebook[prev_R] * self.hidden_projection(h_RH).to(self.predecessor_codebook.dtype)
        return torch.einsum("rd,rkd->rk", context, self.successor_codebook[cand_RK])


def shape_logits(logits: torch.Tensor, multiplier: float, softcap: float | None) -> torch.Tensor:
    """DFlash2's unary logits from the head's raw ones: scaled first, then capped."""
    if multiplier != 1:
        logits = logits * multiplier
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits
