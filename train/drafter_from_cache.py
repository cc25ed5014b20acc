"""The drafter config against the cache: dimensions come from the cache, every contradiction is refused before
training, naming the key to change."""

import dataclasses
import tempfile

from cache_schema import CacheReader
from cache_schema.layout import TOKENIZER_DIR
from train.config import DrafterConfig, TrainConfig, validate_architecture


def resolve_drafter(cfg: TrainConfig, reader: CacheReader) -> DrafterConfig:
    """The drafter config with the target's dimensions and the mask token filled in from the cache."""
    m, d = reader.manifest, cfg.drafter
    from_cache = {"hidden_size": m.target.hidden_size, "vocab_size": m.target.vocab_size,
                  "target_layer_ids": list(m.target_layer_ids)}
    problems = [f"drafter.{key}={getattr(d, key)} but the cache's target has {key} {value}"
                for key, value in from_cache.items()
                if getattr(d, key) is not None and _plain(getattr(d, key)) != value]
    if cfg.expect_target and cfg.expect_target != m.target.name_or_path:
        problems.append(f"expect_target={cfg.expect_target!r} but the cache was extracted from "
                        f"{m.target.name_or_path!r}")
    if problems:
        raise ValueError(f"drafter config does not match cache {reader.loc.url}: " + "; ".join(problems))
    mask_id = d.mask_token_id if d.mask_token_id is not None else first_unused_token(reader)
    if not 0 <= mask_id < m.target.vocab_size:
        raise ValueError(f"drafter.mask_token_id={mask_id} must be a target vocabulary id < {m.target.vocab_size}")
    resolved = dataclasses.replace(d, **from_cache, mask_token_id=mask_id)
    validate_architecture(resolved, m.target.vocab_size, cfg.objective.draft_vocab_size)
    return resolved


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def first_unused_token(reader: CacheReader) -> int:
    """len(tokenizer) of the tokenizer stored in the cache: the first id no text can produce."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        src = reader.loc.path(TOKENIZER_DIR)
        if not reader.loc.fs.exists(src):
            raise ValueError(f"drafter.mask_token_id is null and cache {reader.loc.url} has no {TOKENIZER_DIR}/ to "
                             "derive it from; set drafter.mask_token_id")
        reader.check_tokenizer()  # a damaged tokenizer file would resolve a wrong mask id
        reader.loc.fs.get(src.rstrip("/") + "/", tmp + "/", recursive=True)
        return len(AutoTokenizer.from_pretrained(tmp))
