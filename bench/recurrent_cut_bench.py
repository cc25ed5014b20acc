"""Cutting a linear-attention target's cache back after a rejected draft: two ways, CPU time per cycle.

  record    what tools.speculative_decoder does: verification records the linear-attention layers' state after each
            block position (transformers' past recording: the block's positions run through the recurrent kernel
            one at a time), and the cut picks the state after the last accepted one
  snapshot  verification runs the chunked kernel over the block unrecorded after a copy of those layers' states;
            a partial accept restores the copy, cuts the attention layers, and re-runs the accepted tokens

Both decode the same prompts (the demo shards' last turns) towards the target's own greedy answer with oracle
drafts (tools/fixtures/oracle_drafts.py, the same random rejection slots on both sides), so every accept length
occurs equally often on both; each side's output is checked against `generate`. A Qwen3-VL row gives the cycle
cost of a target whose cache is cut by dropping positions alone.

    python bench/recurrent_cut_bench.py [--block 8] [--max-new-tokens 96] [--threads 1]
"""

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from extract.formats import SkipSample  # noqa: E402
from extract.prompts import GenerationSettings, Prompts  # noqa: E402
from extract.regenerate import generate, last_turn_prompt  # noqa: E402
from extract.target import load_target  # noqa: E402
from tools.fixtures.demo_shards import write_shards  # noqa: E402
from tools.fixtures.oracle_drafts import OracleDecoder  # noqa: E402
from tools.fixtures.tiny_targets import build_target  # noqa: E402
from tools.spec_decode import shard_conversations  # noqa: E402
from train.config import DrafterConfig  # noqa: E402
from train.model import Drafter  # noqa: E402
from train.replay import GreedyDrafter  # noqa: E402


class SnapshotDecoder(OracleDecoder):
    """The alternative: copy the linear-attention layers' states before each verification, restore and re-run."""

    def _record(self, kv):
        pass  # unrecorded: the chunked kernel, fixed-size states

    def _forward(self, inputs, cache, keep=0):
        if cache is not None and int(cache.get_seq_length()) > 0:
            self.before = (int(cache.get_seq_length()), inputs,
                           {i: copy.deepcopy(layer) for i, layer in enumerate(cache.layers)
                            if hasattr(layer, "recurrent_states")})
        return super()._forward(inputs, cache, keep)

    def _cut(self, kv, length):
        if int(kv.get_seq_length()) == length:
            return
        start, inputs, linear = self.before
        verified = int(kv.get_seq_length())  # read before any layer is restored: layer 0 is a linear one
        for i, layer in enumerate(kv.layers):
            if i in linear:
                kv.layers[i] = copy.deepcopy(linear[i])
            else:
                layer.crop(start - verified)
        if length > start:  # re-run the kept tokens from the restored state
            keep = length - start
            rerun = {"input_ids": inputs["input_ids"][:, :keep], "position_ids": inputs["position_ids"][..., :keep]}
            self.before = None
            self.target.model(**rerun, past_key_values=kv, use_cache=True, logits_to_keep=1)


def prompts_of(target, shards, max_new: int) -> list[dict]:
    renderer, out = Prompts(target, GenerationSettings(max_new_tokens=max_new)), []
    for shard in shards:
        for conv in shard_conversations(str(shard)):
            try:
                out.append(last_turn_prompt(renderer, conv))
            except SkipSample:
                pass
    return out


def placeholder_drafter(target, block: int) -> GreedyDrafter:
    """Never asked to draft (the oracle drafts); it only gives the decoder its block size and mask id."""
    head = target.head_tensors()
    V, H = head["lm_head"].shape
    cfg = DrafterConfig(hidden_size=H, vocab_size=V, target_layer_ids=[1], num_layers=1, num_attention_heads=2,
                        num_key_value_heads=1, head_dim=16, intermediate_size=32, block_size=block,
                        mask_token_id=V - 1)
    return GreedyDrafter.of(Drafter(cfg, head["embed_tokens"], head["lm_head"]).eval(), head["lm_head"], block, V - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            shards = write_shards(Path(tmp) / "shards", shards=2, samples=8)
            print("| target | way | prompts | cycles | ms / cycle | vs record | lossless |\n" + "|---" * 7 + "|")
            for family in ("qwen3_5", "qwen3_5_moe", "qwen3_vl"):
                # No end-of-turn boost: answers run to the token limit, so every prompt gives many cycles.
                path = build_target(family, Path(tmp) / "targets", end_scale=0.0)
                target = load_target(str(path), dtype="float32", device="cpu")
                prompts = prompts_of(target, shards, args.max_new_tokens)
                answers = [generate(target, batch, args.max_new_tokens)[0][0] for batch in prompts]
                drafter = placeholder_drafter(target, args.block)
                ways = [("record", OracleDecoder)] + ([("snapshot", SnapshotDecoder)]
                                                      if target.traits.recurrent_state else [])
                base = None
                for way, cls in ways:
                    spec = cls(target, drafter, [1], "sequential", "bf16")
                    cycles, lossless, start = 0, 0, time.perf_counter()
                    for i, (batch, answer) in enumerate(zip(prompts, answers)):
                        out = spec.decode_towards(batch, answer, args.max_new_tokens, seed=i)
                        cycles += len(out.accepted)
                        lossless += out.tokens == answer
                    ms = (time.perf_counter() - start) * 1e3 / cycles
                    base = base or ms
                    print(f"| {family} | {way} | {len(prompts)} | {cycles} | {ms:.2f} | {ms / base:.2f}x | "
                          f"{lossless}/{len(prompts)} |")
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    main()
