"""Input shards: expansion of shard specs, rank assignment, output shard names, and record iteration."""

import hashlib
import logging
import os
import tarfile
from collections.abc import Iterator

import fsspec
import webdataset as wds
from braceexpand import braceexpand
from webdataset.gopen import gopen_schemes
from webdataset.tariterators import base_plus_ext

from extract.formats import IMAGE_EXTS, Conversation, SkipSample, guarded, parse_sample

log = logging.getLogger(__name__)
# A member (json or image) above this is a counted skip, never read: what a compressed tar declares is not what
# we hold in memory.
MAX_MEMBER_BYTES = 64 << 20
MAX_KEY_CHARS = 512


class IncompleteShard(Exception):
    """An input shard that could not be read to its end; its output is not committed, so a re-run retries it."""

    def __init__(self, url: str, reason: str, detail: str):
        super().__init__(f"input shard {url}: {reason}: {detail}")
        self.url, self.reason, self.detail = url, reason, detail


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _split_outside_braces(text: str) -> list[str]:
    """Split a comma-separated list, leaving the commas of brace alternatives (`{a,b}.tar`) to braceexpand."""
    parts, depth, start = [], 0, 0
    for i, c in enumerate(text):
        depth += (c == "{") - (c == "}")
        if c == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def expand_shards(spec: str | list[str]) -> list[str]:
    """Brace patterns, comma-separated lists, or a list of either; local paths, URLs and `pipe:` commands.

    A shard listed twice (the same spelling, or two spellings of one local file) is kept once, at its first
    place; local paths are normalised (`./a.tar` -> `a.tar`) so their output names do not depend on spelling.
    """
    items = [spec] if isinstance(spec, str) else list(spec)
    listed = []
    for item in items:
        for part in _split_outside_braces(str(item)):
            if part.strip():
                listed.extend(braceexpand(part.strip()))
    if not listed:
        raise ValueError("data.shards names no input shard")
    local_missing = [u for u in listed if _is_local(u) and not os.path.exists(u)]
    if local_missing:
        raise ValueError(f"data.shards: {len(local_missing)} input shards do not exist, e.g. {local_missing[0]}")
    out, seen = [], set()
    for url in listed:
        url = os.path.normpath(url) if _is_local(url) else url
        identity = os.path.realpath(url) if _is_local(url) else url
        if identity not in seen:
            seen.add(identity)
            out.append(url)
    if len(out) < len(listed):
        log.warning("data.shards lists %d input shards more than once; each is read once", len(listed) - len(out))
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


class _EndAwareTarInfo(tarfile.TarInfo):
    """Notes on its archive whether iteration stopped at the end-of-archive zero block.

    tarfile ends iteration quietly both at that block and at a plain end of data, so an archive cut at a
    member boundary or inside a header would otherwise look complete.
    """

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:  # raised for a block of 512 zero bytes only
            tar.reached_end_marker = True
            raise


def _open(url: str):
    scheme = url.split(":", 1)[0] if "://" in url or url.startswith("pipe:") else ""
    try:
        if scheme and scheme not in gopen_schemes:  # e.g. s3://, which webdataset cannot open but fsspec can
            return fsspec.open(url, "rb").open()
        return wds.gopen(url)
    except (OSError, ValueError) as e:  # webdataset raises ValueError for a pipe that does not start
        raise IncompleteShard(url, "unreadable", f"{type(e).__name__}: {e}") from e


def used(suffix: str) -> bool:
    """Whether a member is one the parser reads: the sample's json or an image."""
    return suffix == "json" or suffix.rsplit(".", 1)[-1] in IMAGE_EXTS


def _members(url: str, stream) -> Iterator[tuple[str, str, bytes | None]]:
    """(key, suffix, bytes) of each regular member the parser uses, as webdataset splits names (bytes None for a
    member over MAX_MEMBER_BYTES, which is never read); raises IncompleteShard unless the archive reads to its
    end-of-archive marker. Members of other suffixes are passed over unread, however large they inflate."""
    try:
        tar = tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndAwareTarInfo)
        tar.reached_end_marker = False
        for info in tar:
            key, suffix = base_plus_ext(info.name)
            suffix = suffix.lower() if suffix else suffix
            if (info.isreg() and key is not None and not os.path.basename(info.name).startswith("__")
                    and used(suffix)):
                yield key, suffix, None if info.size > MAX_MEMBER_BYTES else tar.extractfile(info).read()
            tar.members = []  # a streamed tar would otherwise keep every member's header
    except (OSError, EOFError, tarfile.TarError) as e:
        raise IncompleteShard(url, "unreadable", f"{type(e).__name__}: {e}") from e
    if not tar.reached_end_marker:
        raise IncompleteShard(url, "truncated",
                              "no end-of-archive marker: the file was cut short or a header is damaged")


def tar_records(url: str, on_skip) -> Iterator[dict]:
    """webdataset records (`__key__`, `__url__`, one entry per member suffix) of one tar, read to its end.

    Adjacent members sharing a key form one record, as in webdataset; a record holding a suffix twice is
    handed to `on_skip(key, SkipSample("duplicate_member"))` instead of ending the shard. Raises IncompleteShard when the archive cannot
    be read to its end (a cut file, a failed read, a `pipe:` command that exits with an error).
    """
    stream = _open(url)
    finished = False
    try:
        record, problem = None, None
        for key, suffix, data in _members(url, stream):
            if record is not None and record["__key__"] != key:
                yield from _checked(record, problem, on_skip)
                record = None
            if record is None:
                record, problem = {"__key__": key, "__url__": url}, bad_key(key)
            if problem is None and suffix in record:
                problem = SkipSample("duplicate_member", "a member name occurs twice in the tar")
            if problem is None and data is None:
                problem = SkipSample("member_too_large", f"{key}.{suffix} is over {MAX_MEMBER_BYTES} bytes")
            record[suffix] = data
        if record is not None:
            yield from _checked(record, problem, on_skip)
        finished = True
    finally:
        try:
            stream.close()  # a `pipe:` command's exit status is checked here
        except OSError as e:
            if finished:
                raise IncompleteShard(url, "unreadable", f"{type(e).__name__}: {e}") from e


def bad_key(key: str) -> SkipSample | None:
    """A sample key must be printable text that names no place outside its shard: it is logged, stored in the
    cache and may become a file name downstream."""
    if (len(key) > MAX_KEY_CHARS or not key.isprintable() or any(0xD800 <= ord(c) < 0xE000 for c in key)
            or key.startswith("/") or ".." in key.split("/")):
        return SkipSample("bad_key", f"{key[:80]!r} is not a plain printable key")
    return None


def _checked(record: dict, problem: SkipSample | None, on_skip) -> Iterator[dict]:
    if problem is None:
        yield record
    else:
        on_skip(record["__key__"][:80], problem)


def conversations(url: str, fmt: str, on_skip) -> Iterator[Conversation]:
    """Parse every record of one input shard; a bad sample's SkipSample goes to `on_skip(key, skip)`."""
    index = 0
    for record in tar_records(url, on_skip):
        try:
            conv = guarded("unreadable_sample", parse_sample, record, url, fmt)
        except SkipSample as skip:
            on_skip(record["__key__"], skip)
            continue
        conv.index, index = index, index + 1
        yield conv
