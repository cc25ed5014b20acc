"""Exact offline replay of greedy speculative decoding from the cache: tau, per-slot acceptance, D2SD.

The cache holds the target's own greedy tokens, so verification can be replayed without the target
(docs/decisions.md, "Offline acceptance"). For each supervised span [start, end) (a maximal run of loss_mask,
assistant content plus its end-of-turn token) the target's prefill produced input_ids[start]; a cycle at anchor
s drafts the block [input_ids[s], MASK x (B-1)] at positions pos[s] + 0..B-1 over the context hidden states of
positions < s, accepts a(s) = the matched prefix of slots 1..B-1 (never past end - 1), commits
min(a(s) + 1, end - 1 - s) tokens and moves to s + a(s) + 1, until s reaches end - 1.

The draft at s does not depend on the walk, so every anchor of a sample is drafted in batched masked passes
first and the walks read the results.
"""

from dataclasses import dataclass

import numpy as np
import torch

from train.attention import build_mask
from train.objective import block_inputs


def spans(loss_mask_T) -> list[tuple[int, int]]:
    """Maximal runs of supervised positions as [start, end) pairs, in order."""
    m = np.concatenate([[False], np.asarray(loss_mask_T, dtype=bool), [False]])
    edges = np.flatnonzero(m[1:] != m[:-1])
    return [(int(a), int(b)) for a, b in zip(edges[::2], edges[1::2])]


@dataclass
class GreedyDrafter:
    """A drafter as the replay runs it: the model, the head rows of its vocabulary, block size and mask id."""

    model: torch.nn.Module
    head_VH: torch.Tensor  # rows of the drafter's vocabulary (draft_ids' rows of the target head when reduced)
    draft_ids: torch.Tensor | None  # draft id -> target id, or None for the full vocabulary
    block: int
    mask_id: int
    backend: str = "dense"
    rows: int = 4096  # query rows (anchors x block) per drafter pass: bounds memory on long samples
    logit_rows: int = 512  # rows per vocabulary projection
    use_selector: bool = True  # DFlash2: walk the selector's path (False: each slot's unary argmax)

    @classmethod
    def of(cls, model, head_VH, block: int, mask_id: int, draft_ids=None, backend: str = "dense") -> "GreedyDrafter":
        """`head_VH` is the target's whole head; a reduced vocabulary takes its `draft_ids` rows."""
        device = next(model.parameters()).device
        dtype = torch.promote_types(next(model.parameters()).dtype, torch.float32)
        head = head_VH.to(device)
        if draft_ids is not None:
            draft_ids = draft_ids.to(device)
            head = head[draft_ids]
        return cls(model=model, head_VH=head.to(dtype), draft_ids=draft_ids, block=block, mask_id=mask_id,
                   backend=backend)

    @classmethod
    def from_checkpoint(cls, ckpt, backend: str = "dense") -> "GreedyDrafter":
        """A `train.checkpoint.DrafterCheckpoint` loaded with the target's head."""
        if ckpt.model.lm_head_VH is None:
            raise ValueError(f"{ckpt.path}: loaded without the target head; pass lm_head_VH to load_drafter")
        return cls.of(ckpt.model, ckpt.model.lm_head_VH, ckpt.drafter.block_size, ckpt.drafter.mask_token_id,
                      ckpt.draft_ids, backend)

    @torch.no_grad()
    def draft(self, sample: dict, anchors_N: torch.Tensor, prefix_N: torch.Tensor):
        """Greedy drafts of the blocks at `anchors_N` whose slots < prefix hold the sample's own tokens.

        Returns (tokens [N, B-1] target ids of slots 1..B-1, confidences [N, B-1]: each drafted token's probability).
        """
        device = self.head_VH.device
        ids_T, pos_T = sample["input_ids"].to(device), sample["positions"].to(device)
        T, B = ids_T.shape[0], self.block
        hidden = sample["hidden"][None].to(device)
        length = torch.tensor([T], device=device)
        tokens, confs = [], []
        per = max(1, self.rows // B)
        for lo in range(0, anchors_N.shape[0], per):
            anchors = anchors_N[lo:lo + per].to(device)[None]
            prefix = prefix_N[lo:lo + per].to(device)
            ids_BQ, pos_BQ, _ = block_inputs(ids_T[None], pos_T[None], length, anchors, prefix[None], B, self.mask_id)
            mask = build_mask(anchors, length, T, B, self.backend)
            h = self.model(hidden, pos_T[None], ids_BQ, pos_BQ, mask, self.backend)
            tok, conf = self.pick(h.view(-1, B, h.shape[-1]), ids_BQ.view(-1, B), prefix)
            tokens.append(tok)
            confs.append(conf)
        tok = torch.cat(tokens) if tokens else torch.zeros(0, B - 1, dtype=torch.long, device=device)
        conf = torch.cat(confs) if confs else torch.zeros(0, B - 1, device=device)
        return tok.cpu(), conf.cpu()

    def pick(self, h_NBH: torch.Tensor, ids_NB: torch.Tensor, prefix_N: torch.Tensor):
        """(target ids [N, B-1], their probabilities) of slots 1..B-1 of blocks whose final hidden states are `h_NBH`
        and inputs `ids_NB` (slots < prefix visible), `logit_rows` rows of logits at a time. DFlash: each slot's
        argmax. DFlash2: the selector's greedy walk over the unary top-k, each slot's predecessor the token before
        it (drafted, or visible); a token's probability is the unary mass of its slot's candidates times the
        selector's share of it."""
        h = h_NBH[:, 1:]
        per = max(1, self.logit_rows // h.shape[1])
        parts = [self._pick(h[i:i + per], ids_NB[i:i + per], prefix_N[i:i + per]) for i in range(0, h.shape[0], per)]
        if not parts:
            return (torch.zeros(0, self.block - 1, dtype=torch.long, device=h.device),
                    torch.zeros(0, self.block - 1, device=h.device))
        return torch.cat([t for t, _ in parts]), torch.cat([c for _, c in parts])

    def _pick(self, h_NKH, ids_NB, prefix_N):
        logits = self.model.shape_logits(h_NKH.to(self.head_VH.dtype) @ self.head_VH.T)  # [N, B-1, V]
        lse = torch.logsumexp(logits, -1)
        selector = self.model.selector if self.use_selector else None
        if selector is None:
            best = logits.max(-1)
            return self.target_ids(best.indices), torch.exp(best.values - lse)
        top_logits, top = logits.topk(selector.top_k, dim=-1)
        set_mass = torch.exp(top_logits - lse[..., None]).sum(-1)
        cand = self.target_ids(top)
        tokens, confs = [], []
        prev = ids_NB[:, 0]
        for k in range(1, self.block):
            if k > 1:
                prev = torch.where(k - 1 < prefix_N, ids_NB[:, k - 1], tokens[-1])
            scores = top_logits[:, k - 1] + selector.transition(h_NKH[:, k - 1], prev, cand[:, k - 1]).to(
                top_logits.dtype)
            choice = scores.argmax(-1, keepdim=True)
            tokens.append(cand[:, k - 1].gather(-1, choice).squeeze(-1))
            confs.append(torch.softmax(scores, -1).gather(-1, choice).squeeze(-1) * set_mass[:, k - 1])
        return torch.stack(tokens, 1), torch.stack(confs, 1)

    def target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        return ids if self.draft_ids is None else self.draft_ids[ids]


def matched(tokens_NK: torch.Tensor, input_ids_T: torch.Tensor, anchors_N: torch.Tensor, ends_N: torch.Tensor):
    """a(s): how many leading draft tokens equal input_ids[s+1 ...], never counting a position >= end."""
    K = tokens_NK.shape[1]
    idx = anchors_N[:, None] + 1 + torch.arange(K)
    inside = idx < ends_N[:, None]
    truth = input_ids_T[idx.clamp_max(input_ids_T.shape[0] - 1)]
    return torch.cumprod(((tokens_NK == truth) & inside).long(), dim=1).sum(1)


def branch_points(conf_NK: torch.Tensor, k: int) -> torch.Tensor:
    """Slots i (1-based) of the k likeliest first rejections, r(i) = c_1 ... c_{i-1} (1 - c_i); ties: lower i."""
    before = torch.cumprod(torch.cat([torch.ones_like(conf_NK[:, :1]), conf_NK[:, :-1]], 1), 1)
    r = before * (1 - conf_NK)
    order = torch.sort(-r, dim=1, stable=True).indices[:, :k]
    return order + 1


@dataclass
class Cycles:
    """One walk over a sample: per verification cycle its anchor, accepted drafts, committed tokens, turn."""

    anchor: np.ndarray
    accepted: np.ndarray
    committed: np.ndarray
    last_turn: np.ndarray  # bool: the cycle is in the sample's last span (the target's own tokens)


def walk(accepted_by_anchor: dict[int, int], sample_spans: list[tuple[int, int]]) -> Cycles:
    rows = []
    for n, (start, end) in enumerate(sample_spans):
        s = start
        while s < end - 1:
            a = accepted_by_anchor[s]
            rows.append((s, a, min(a + 1, end - 1 - s), n == len(sample_spans) - 1))
            s += a + 1
    cols = list(zip(*rows)) if rows else [(), (), (), ()]
    return Cycles(*(np.asarray(c, dtype=t) for c, t in zip(cols, (np.int64, np.int64, np.int64, bool))))


def accepted_lengths(dflash: GreedyDrafter, sample: dict, vp: GreedyDrafter | None = None, k: int = 4):
    """a(s) at every anchor of a sample (a `train.data.CacheDataset` item), before any walk.

    Returns (spans, anchors [N], {"dflash": a [N]} plus, with a VP drafter, "d2sd": the longest match among the
    DFlash draft and the VP drafter's branches from its k likeliest first rejections)."""
    sample_spans = spans(sample["loss_mask"].numpy())
    anchors = torch.tensor([s for a, e in sample_spans for s in range(a, e - 1)], dtype=torch.long)
    ends = torch.tensor([e for a, e in sample_spans for _ in range(a, e - 1)], dtype=torch.long)
    ids = sample["input_ids"]
    tokens, conf = dflash.draft(sample, anchors, torch.ones_like(anchors))
    acc = {"dflash": matched(tokens, ids, anchors, ends)}
    if vp is None:
        return sample_spans, anchors, acc
    if vp.block != dflash.block:
        raise ValueError(f"D2SD needs equal block sizes: the VP drafter has {vp.block}, DFlash {dflash.block}")
    points = branch_points(conf, k)  # [N, k]
    # A branch at i keeps the DFlash tokens of slots < i: unless those all matched (i <= a + 1) it is rejected
    # where the DFlash draft is, so only the others are drafted, and their kept tokens are the sample's own.
    row, col = torch.nonzero(points <= acc["dflash"][:, None] + 1, as_tuple=True)
    best = acc["dflash"].clone()
    if row.numel():
        i = points[row, col]
        vp_tokens, _ = vp.draft(sample, anchors[row], i)
        branch = torch.where(torch.arange(1, dflash.block) < i[:, None], tokens[row], vp_tokens)
        best.scatter_reduce_(0, row, matched(branch, ids, anchors[row], ends[row]), reduce="amax")
    acc["d2sd"] = best
    return sample_spans, anchors, acc


def replay_sample(dflash: GreedyDrafter, sample: dict, vp: GreedyDrafter | None = None, k: int = 4) -> dict[str, Cycles]:
    """The walks of one sample: {"dflash": Cycles} and, with a VP drafter, {"d2sd": Cycles} (D2SD verifies all
    its branches in one target pass, so each of its cycles counts once)."""
    sample_spans, anchors, acc = accepted_lengths(dflash, sample, vp, k)
    return {m: walk(dict(zip(anchors.tolist(), a.tolist())), sample_spans) for m, a in acc.items()}


GROUPS = ("all", "images", "text_only", "last_turn", "history")


def shown(x, spec: str = ".3f") -> str:
    """A figure as every table prints it: "-" where there is none."""
    return "-" if x is None else format(x, spec)


def acceptance(accepted: np.ndarray, committed: int, block: int) -> dict:
    """The figures of a set of verification cycles: tau = committed tokens / cycles, P(slot k accepted | cycle)
    for k = 1..B-1 and the histogram of accepted drafts per cycle over 0..B-1. Offline and online alike."""
    a = np.asarray(accepted, dtype=np.int64)
    return {"cycles": int(a.size), "committed": int(committed), "tau": committed / a.size if a.size else None,
            "accept_per_slot": [float((a >= s).mean()) if a.size else None for s in range(1, block)],
            "accepted_hist": np.bincount(a, minlength=block).tolist()}


def replay_figures(records: list[dict], block: int, method: str = "dflash") -> dict[str, dict]:
    """Figures per group from records {"images": bool, method: Cycles}: tau pooled over cycles and averaged
    per sample, P(slot k accepted | cycle) for k = 1..B-1, and the histogram of a(s) over 0..B-1."""
    out = {}
    for group in GROUPS:
        acc, com, per_sample = [], [], []
        for rec in records:
            if (group == "images" and not rec["images"]) or (group == "text_only" and rec["images"]):
                continue
            c: Cycles = rec[method]
            keep = (c.last_turn if group == "last_turn" else ~c.last_turn if group == "history"
                    else np.ones_like(c.last_turn))
            if keep.any():
                acc.append(c.accepted[keep])
                com.append(c.committed[keep])
                per_sample.append(com[-1].sum() / keep.sum())
        a = np.concatenate(acc) if acc else np.zeros(0, dtype=np.int64)
        out[group] = {"samples": len(per_sample), **acceptance(a, int(sum(x.sum() for x in com)), block),
                      "tau_per_sample": float(np.mean(per_sample)) if per_sample else None}
    return out


def sample_meta(reader, sample_id: int) -> tuple[str, bool]:
    """(key, has images) of a cached sample, from its shard's meta alone."""
    shard, local = reader.locate(sample_id)
    meta = reader.metas(shard)[local]
    if "num_image_tokens" not in meta:
        raise ValueError(f"shard {shard}, sample {local}: meta has no num_image_tokens")
    return meta["key"], int(meta["num_image_tokens"]) > 0


def replay_records(dataset, indices, dflash: GreedyDrafter, vp: GreedyDrafter | None = None, k: int = 4,
                   progress: bool = False) -> list[dict]:
    """Per sample of `dataset` (a `train.data.CacheDataset`) at `indices`: sample_id, key, images and the walks."""
    from tqdm import tqdm

    records = []
    for i in tqdm(indices, desc="replay", unit="sample", disable=not progress):
        sample = dataset[i]
        key, images = sample_meta(dataset.reader, int(sample["sample_id"]))
        records.append({"sample_id": int(sample["sample_id"]), "key": key, "images": images,
                        **replay_sample(dflash, sample, vp, k)})
    return records
