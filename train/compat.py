"""Drafter config against cache: every mismatch is refused before training, naming the key to change."""

import os

from cache_schema import CacheReader
from cache_schema.layout import TOKENIZER_DIR
from train.config import TrainConfig


def check_cache(cfg: TrainConfig, reader: CacheReader) -> int:
    """Raise ValueError on any mismatch; return the resolved mask token id."""
    m, d = reader.manifest, cfg.drafter
    problems = []
    if d.hidden_size != m.target.hidden_size:
        problems.append(f"drafter.hidden_size={d.hidden_size} but the cache's target has hidden_size "
                        f"{m.target.hidden_size}")
    if list(d.target_layer_ids) != list(m.target_layer_ids):
        problems.append(f"drafter.target_layer_ids={list(d.target_layer_ids)} but the cache holds layers "
                        f"{m.target_layer_ids}")
    if d.vocab_size != m.target.vocab_size:
        problems.append(f"drafter.vocab_size={d.vocab_size} but the cache's target has vocab_size "
                        f"{m.target.vocab_size}")
    if cfg.expect_target and cfg.expect_target != m.target.name_or_path:
        problems.append(f"expect_target={cfg.expect_target!r} but the cache was extracted from "
                        f"{m.target.name_or_path!r}")
    if problems:
        raise ValueError(f"drafter config does not match cache {reader.loc.url}: " + "; ".join(problems))
    mask_id = d.mask_token_id if d.mask_token_id is not None else first_unused_token(reader)
    if not 0 <= mask_id < m.target.vocab_size:
        raise ValueError(f"drafter.mask_token_id={mask_id} must be a target vocabulary id < {m.target.vocab_size}")
    return mask_id


def first_unused_token(reader: CacheReader) -> int:
    path = reader.loc.path(TOKENIZER_DIR)
    if reader.loc.is_url or not os.path.isdir(path):
        raise ValueError("drafter.mask_token_id is null and the cache has no local tokenizer/ to derive it from; "
                         "set drafter.mask_token_id (Qwen3: 151669)")
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(path))
