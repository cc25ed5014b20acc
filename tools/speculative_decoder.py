"""Greedy speculative decoding with a Hugging Face target and a DFlash drafter, one prompt at a time.

After the target's prefill writes the first answer token, each cycle drafts the block [last token, MASK x (B-1)]
at the drafter's positions (its recorded position source, as in training) over the drafter's own cache of the
fused context, verifies it with one target forward, accepts a = the leading draft tokens equal to the target's
greedy tokens, and commits them plus the target's own next token, never past the end-of-turn token or
`max_new_tokens`. The target's cache is then cut back to the committed prefix: attention layers drop the
rejected positions; linear-attention layers (Qwen3.5/3.6) keep a state, not positions, so verification records
their state after every block position (transformers' past recording, as serving engines keep per-position
states) and the cut returns them to the state after the last accepted one (docs/decisions.md says why not a
snapshot and a re-run). The drafter's context grows by the verified positions' hidden states rounded as the cache
stores them (bf16 words, or fp8 codes with their scales). Every committed token is the target's greedy choice,
so the output equals `generate(do_sample=False)` up to ties that a block forward breaks differently from a
one-token forward.

D2SD (a VP drafter beside): branches from the first draft's k likeliest first-rejection points keep its tokens
before the point and take the VP drafter's from there; branches are verified one after another, and a branch
that the first draft's verification already refutes (it differs from the target's tokens before the first
draft's rejection, or it is rejected where the first draft is) is not sent to the target. The longest match is
committed; each cycle counts once, however many forwards it took.
"""

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from cache_schema.codecs import CODECS
from extract.target import Target
from train.config import SERVED_POSITION_SOURCES, check_choice
from train.model import ContextCache
from train.replay import GreedyDrafter, branch_points


def may_beat(draft: torch.Tensor, a: int, greedy: torch.Tensor) -> bool:
    """Whether a branch can be accepted further than a verified draft that matched `a` slots, whose verification
    gave the target's tokens `greedy`: it must equal them up to and including that draft's first rejected slot
    (the target's tokens there depend only on the shared, accepted prefix)."""
    return a < draft.numel() and bool((draft[:a + 1] == greedy[:a + 1]).all())


@dataclass
class Decoded:
    tokens: list[int]  # generated ids, the first from the prefill
    accepted: list[int] = field(default_factory=list)  # a per cycle
    # Draft tokens equal to the target's per cycle, also past the end of the answer: what vLLM's counters count.
    matched: list[int] = field(default_factory=list)
    committed: list[int] = field(default_factory=list)  # tokens committed per cycle
    forwards: int = 0  # target forwards after the prefill
    seconds: float = 0.0
    overwritten: int = 0  # context tokens whose drafter cache slot a later one took (`shared_slots`)


def one_slot_per_position(hidden_1TLH: torch.Tensor, pos_1T: torch.Tensor) -> tuple[torch.Tensor, int]:
    """New context as a drafter cache of one slot per position holds it, filled in order by one thread (vLLM's V1
    runner on one core, docs/vllm_cpu_defects.md): a token whose position the next one shares is overwritten, while
    attention still reads as many slots as there are tokens, the overwritten tokens' ones empty. Their rows become
    zeros, whose keys and values are zero (the drafter's projections have no bias; RMSNorm and rotary keep zero).
    Also how many were overwritten. Each call's positions lie above the previous call's, so only tokens of one call
    share a slot."""
    gone = torch.zeros(pos_1T.shape[1], dtype=torch.bool, device=hidden_1TLH.device)
    gone[:-1] = (pos_1T[0, :-1] == pos_1T[0, 1:]).to(hidden_1TLH.device)
    return hidden_1TLH.masked_fill(gone[None, :, None, None], 0), int(gone.sum())


@dataclass
class SpeculativeDecoder:
    target: Target
    dflash: GreedyDrafter
    layer_ids: list[int]
    position_source: str  # sequential | mrope_axis0
    hidden_dtype: str  # the cache's storage: bf16 | fp8_e4m3
    vp: GreedyDrafter | None = None
    k: int = 4
    # Feed the drafter the target's hidden states as computed, as serving engines do, instead of rounded as the
    # cache stores them (what training saw).
    engine_precision: bool = False
    # Model a drafter cache of one slot per position, as vLLM's V1 runner keeps it (docs/vllm_cpu_defects.md).
    shared_slots: bool = False

    def __post_init__(self):
        check_choice("position_source", self.position_source, SERVED_POSITION_SOURCES)
        if self.hidden_dtype not in CODECS:
            raise ValueError(f"cache storage.hidden_dtype={self.hidden_dtype!r}; known: {sorted(CODECS)}")
        if self.vp is not None and self.vp.block != self.dflash.block:
            raise ValueError(f"D2SD needs equal block sizes: the VP drafter has {self.vp.block}, DFlash "
                             f"{self.dflash.block}")
        if self.k < 1:
            raise ValueError(f"k={self.k} must be >= 1")
        self.codec = CODECS[self.hidden_dtype]
        self.suppress = self.target.suppressed_ids
        self.device = self.dflash.head_VH.device

    # --- the target

    def _cache(self) -> DynamicCache:
        """An empty decoding cache; a target whose cache has linear-attention layers must say so in its record."""
        kv = DynamicCache(config=self.target.model.config)
        linear = [i for i, layer in enumerate(kv.layers) if hasattr(layer, "recurrent_states")]
        if linear and not self.target.traits.recurrent_state:
            raise ValueError(f"the target's cache has linear-attention layers {linear}, whose state a rejected draft "
                             f"cannot be cut out of, but the {self.target.family!r} record says recurrent_state=False "
                             "(extract/families.py)")
        return kv

    def _record(self, kv: DynamicCache) -> None:
        """After the prefill (which ran as generate's does): linear-attention layers record their state after each of
        a forward's last B positions, so that a cut can return to any of them; every later forward is one block."""
        if self.target.traits.recurrent_state:
            kv.activate_past_recording(recurrent_states_to_keep=self.dflash.block)

    def _cut(self, kv: DynamicCache, length: int) -> None:
        """Keep the first `length` positions of the target's cache (crop takes the count to remove, negated). Also
        when nothing is removed: a recording linear-attention layer then forgets the history it no longer needs."""
        extra = int(kv.get_seq_length()) - length
        assert extra >= 0, (int(kv.get_seq_length()), length)
        kv.crop(-extra)

    def _forward(self, inputs: dict, cache: DynamicCache | None, keep: int = 0):
        """Greedy next tokens after each input position (the last `keep`, or all) and the captured hidden states,
        rounded as the cache stores them unless `engine_precision`, [1, n, L, H] on the drafter's device; the
        target's cache grows."""
        with self.target.capture(self.layer_ids) as captured:
            out = self.target.model(**inputs, past_key_values=cache, use_cache=True, logits_to_keep=keep)
        logits = out.logits[0].float()
        if self.suppress:
            logits[:, self.suppress] = float("-inf")
        hidden_TLH = torch.stack([captured[i][0] for i in self.layer_ids], dim=1)
        if not self.engine_precision:
            hidden_TLH = self.codec.decode(*self.codec.encode(hidden_TLH))
        return logits.argmax(-1).cpu(), hidden_TLH[None].to(self.device), out.past_key_values

    def step_inputs(self, ids: list[int], start: int, delta: int) -> dict:
        """Tokens at sequence positions start.. with the position ids `generate` would give them: text positions,
        and for M-RoPE targets the same shifted by the prompt's rope delta on every axis."""
        dev = self.target.device
        pos = torch.arange(start, start + len(ids), device=dev)[None]
        if self.target.traits.mrope:
            pos = torch.cat([pos[None], (pos + delta)[None].expand(3, -1, -1)])
        return {"input_ids": torch.tensor([ids], device=dev), "position_ids": pos}

    # --- the drafter

    def drafter_positions(self, start: int, n: int, axis0_P: torch.Tensor, delta: int) -> torch.Tensor:
        t = torch.arange(start, start + n)
        if self.position_source == "sequential":
            return t[None].to(self.device)
        prompt = axis0_P[t.clamp_max(axis0_P.numel() - 1)]
        return torch.where(t < axis0_P.numel(), prompt, t + delta)[None].to(self.device)

    def _draft(self, drafting: GreedyDrafter, cache: ContextCache, ids_RB: torch.Tensor, pos_B: torch.Tensor,
               prefix_R: torch.Tensor):
        """Greedy target ids [R, B-1] of slots 1..B-1 (slots < prefix visible) and their confidences."""
        ids_RB = ids_RB.to(self.device)
        h = drafting.model.draft(cache, ids_RB, pos_B.expand(ids_RB.shape[0], -1))
        tokens, conf = drafting.pick(h, ids_RB, prefix_R.to(self.device))  # the replay's own rule: online = offline
        return tokens.cpu(), conf.cpu()

    def _branches(self, vp_cache: ContextCache, last: int, first: torch.Tensor, conf: torch.Tensor,
                  pos_B: torch.Tensor) -> list[torch.Tensor]:
        """The VP drafter's branches [B-1] from the first draft's k likeliest first-rejection slots."""
        B = self.dflash.block
        points = branch_points(conf[None], min(self.k, B - 1))[0]
        slot = torch.arange(B)
        ids = torch.full((points.numel(), B), self.vp.mask_id, dtype=torch.long)
        ids[:, 0] = last
        visible = (slot[None, 1:] < points[:, None])
        ids[:, 1:] = torch.where(visible, first[None], ids[:, 1:])
        vp_tokens, _ = self._draft(self.vp, vp_cache, ids, pos_B, points)
        return list(torch.where(visible, first[None], vp_tokens))

    # --- the loop

    @torch.no_grad()
    def decode(self, batch: dict, max_new_tokens: int) -> Decoded:
        """Speculative greedy continuation of one encoded prompt (processor outputs, batch of 1)."""
        if batch["input_ids"].shape[0] != 1:
            raise ValueError("speculative decoding runs one prompt at a time; got a batch of "
                             f"{batch['input_ids'].shape[0]}")
        start = time.perf_counter()
        eos = set(self.target.eos_ids)
        batch = {k: v.to(self.target.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        P = batch["input_ids"].shape[1]
        pos3 = self.target.position_ids(batch)[:, 0]  # [3, P]
        delta = int(pos3.max()) + 1 - P  # M-RoPE positions of later text tokens: index + delta
        axis0 = pos3[0].cpu()
        B = self.dflash.block
        kv = self._cache()
        greedy, hidden, kv = self._forward(batch, kv, keep=1)
        self._record(kv)
        out = Decoded(tokens=[int(greedy[-1])])
        caches = [ContextCache(len(d.model.layers)) for d in (self.dflash, self.vp) if d is not None]
        new_hidden, new_at = hidden, 0  # verified positions not yet in the drafters' caches, and where they start
        while out.tokens[-1] not in eos and len(out.tokens) < max_new_tokens:
            n = P + len(out.tokens)  # sequence length; the last token's hidden state does not exist yet
            ctx_pos = self.drafter_positions(new_at, new_hidden.shape[1], axis0, delta)
            context, overwritten = one_slot_per_position(new_hidden, ctx_pos) if self.shared_slots else (new_hidden, 0)
            out.overwritten += overwritten
            for drafting, cache in zip((self.dflash, self.vp), caches):
                drafting.model.extend_context(cache, context, ctx_pos)
            last = out.tokens[-1]
            pos_B = self.drafter_positions(n - 1, B, axis0, delta)
            block = torch.full((1, B), self.dflash.mask_id, dtype=torch.long)
            block[0, 0] = last
            first, conf = self._draft(self.dflash, caches[0], block, pos_B, torch.ones(1, dtype=torch.long))
            candidates = [first[0]]
            if self.vp is not None:
                candidates += self._branches(caches[1], last, first[0], conf[0], pos_B)
            best = None  # (a, draft, greedy, hidden)
            for draft in candidates:
                if best is not None and not may_beat(draft, best[0], best[2]):
                    continue
                if best is not None:
                    self._cut(kv, n - 1)
                greedy, hidden, _ = self._forward(self.step_inputs([last, *draft.tolist()], n - 1, delta), kv)
                out.forwards += 1
                a = int(torch.cumprod((draft == greedy[:-1]).long(), 0).sum())
                # A branch verified after the first matched past the earlier best's rejection, so the last one
                # verified is the longest (and it is what the target's cache holds).
                best = (a, draft, greedy, hidden)
            a, draft, greedy, hidden = best
            commit = [*draft[:a].tolist(), int(greedy[a])]
            self._cut(kv, n + a)
            stop = next((i + 1 for i, t in enumerate(commit) if t in eos), len(commit))
            commit = commit[:min(stop, max_new_tokens - len(out.tokens))]
            out.accepted.append(min(a, len(commit)))
            out.matched.append(a)
            out.committed.append(len(commit))
            out.tokens += commit
            new_hidden, new_at = hidden[:, :a + 1], n - 1
        out.seconds = time.perf_counter() - start
        return out
