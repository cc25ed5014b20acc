"""Input shards: expansion of shard specs, rank assignment, output shard names, and record iteration."""

import hashlib
import logging
import os
import tarfile
from collections import Counter
from collections.abc import Iterator

import webdataset as wds
from braceexpand import braceexpand

from extract.formats import Conversation, SkipSample, parse_sample

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, comma-separated lists, or a list of either; local paths, URLs and `pipe:` commands."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        for part in str(item).split(","):
            part = part.strip()
            if part:
                out.extend(braceexpand(part))
    if not out:
        raise ValueError("data.shards names no input shard")
    local_missing = [u for u in out if "://" not in u and not u.startswith("pipe:") and not os.path.exists(u)]
    if local_missing:
        raise ValueError(f"data.shards: {len(local_missing)} input shards do not exist, e.g. {local_missing[0]}")
    return out


def shards_for_rank(shards: list[str], rank: int, world: int) -> list[str]:
    """Each input shard goes to exactly one rank, round-robin in listed order."""
    return shards[rank::world]


def output_shard_name(url: str) -> str:
    """Deterministic, traceable output name: the input's stem plus a hash of its full address."""
    stem = url.rstrip("/").rsplit("/", 1)[-1]
    for ext in (".tar.gz", ".tgz", ".tar"):
        stem = stem.removesuffix(ext)
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in stem) or "shard"
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:8]}"


def _all(urls):
    return urls


def conversations(url: str, fmt: str, skips: Counter, on_skip) -> Iterator[Conversation]:
    """Parse every record of one input shard; bad samples go to `on_skip(key, SkipSample)` and are counted."""
    # Ranks are assigned whole shards by shards_for_rank, so webdataset must not split them again.
    dataset = wds.WebDataset([url], shardshuffle=False, empty_check=False, nodesplitter=_all, workersplitter=_all)
    try:
        for record in dataset:
            try:
                yield parse_sample(record, source=url, fmt=fmt)
            except SkipSample as skip:
                skips[skip.reason] += 1
                on_skip(record.get("__key__", "?"), skip)
    except (OSError, EOFError, tarfile.TarError) as e:  # truncated or malformed tar: keep what was read
        skips["unreadable_shard"] += 1
        on_skip(url, SkipSample("unreadable_shard", str(e)))
