"""Reading token ranges straight from chunk files, for the codec chains this package writes.

zarr's own read path costs several times the bytes it moves (bench/cache_bench.py, "Read paths"): an asyncio
round trip and a chain of buffer objects per chunk. The chains the writer produces are few and fixed
(little-endian bytes, then optionally zstd, then crc32c), so a chunk is decoded here in plain steps: check the
crc32c, zstd-decompress into the output array. Chunks are read and decoded on a thread pool (file reads, zstd
and crc32c release the GIL); object stores get one concurrent `fs.cat` for all chunks of a call. Arrays with any
other chain, or another chunk grid, go through zarr (`plan` returns None); both paths give identical arrays
(tests).
"""

import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
from crc32c import crc32c
from numcodecs import Zstd
from zarr.codecs import BytesCodec, Crc32cCodec, ZstdCodec

from cache_schema.layout import CacheCorruptionError

_ZSTD = Zstd()
DECODE_THREADS = 4
_POOL: tuple[int, ThreadPoolExecutor] | None = None
_local = threading.local()


def _pool() -> ThreadPoolExecutor:
    """This process's decode pool: a forked DataLoader worker inherits the parent's object but not its threads."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid():
        _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=DECODE_THREADS, thread_name_prefix="cache_decode"))
    return _POOL[1]


@dataclass(frozen=True)
class ChunkPlan:
    """How to find and decode the chunks of one array along its first (token) axis."""

    where: str  # "shard S, array A", for errors
    base: str  # fsspec path of the array's folder
    rows: int  # tokens per chunk
    row_shape: tuple
    dtype: np.dtype
    zstd: bool
    keys: object  # the array metadata's chunk-key encoder

    def path(self, chunk: int) -> str:
        return f"{self.base}/{self.keys((chunk,) + (0,) * len(self.row_shape))}"

    def decode(self, data, chunk: int, out: np.ndarray | None) -> np.ndarray:
        """Check one chunk's bytes and return its rows: decoded into `out` (C-contiguous, one chunk's shape)
        when given, else (uncompressed only) a read-only view of `data`."""
        body = memoryview(data)[:-4]
        if len(data) < 4 or crc32c(body) != int.from_bytes(data[-4:], "little"):
            raise CacheCorruptionError(f"{self.where}: chunk {chunk} fails its crc32c check")
        try:
            if self.zstd:
                # numcodecs fills a shorter frame's worth of `out` without a word, and the scratch `out` holds
                # another chunk's rows: the frame must declare exactly one chunk.
                if (size := _frame_content_size(body)) != out.nbytes:
                    raise ValueError(f"a zstd frame of {size} bytes for a chunk of {out.nbytes}")
                return _ZSTD.decode(body, out=out)
            rows = np.frombuffer(body, dtype=self.dtype).reshape(self.rows, *self.row_shape)
            if out is None:
                return rows
            out[...] = rows
            return out
        except (RuntimeError, ValueError) as e:
            raise CacheCorruptionError(f"{self.where}: chunk {chunk} does not decode: {e}") from e

    @property
    def max_bytes(self) -> int:
        """A file read stops past this, so a chunk that is a link to an endless file never fills memory."""
        return max_chunk_bytes(self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize)

    def scratch(self) -> np.ndarray:
        """This thread's buffer for one decoded chunk, reused: fresh pages would cost a fault per 4 KiB."""
        size = self.rows * int(np.prod(self.row_shape)) * self.dtype.itemsize
        if getattr(_local, "buf", None) is None or _local.buf.nbytes < size:
            _local.buf = np.empty(size, dtype=np.uint8)
        return _local.buf[:size].view(self.dtype).reshape(self.rows, *self.row_shape)


def max_chunk_bytes(raw: int) -> int:
    """The most bytes a chunk file of `raw` decoded bytes can hold: a compressor's worst-case growth on
    incompressible data (zstd and blosc add well under 1/128 plus a header) and the crc32c."""
    return raw + (raw >> 7) + 1024 + 4


def _frame_content_size(frame) -> int | None:
    """The decompressed size a zstd frame's header declares (RFC 8878, 3.1.1.1); None if it declares none."""
    if len(frame) < 6 or bytes(frame[:4]) != b"\x28\xb5\x2f\xfd":
        return None
    descriptor = frame[4]
    single_segment = descriptor >> 5 & 1
    at = 5 + (1 - single_segment) + (0, 1, 2, 4)[descriptor & 3]  # past the window and dictionary fields
    width = (single_segment, 2, 4, 8)[descriptor >> 6]
    if not width or len(frame) < at + width:
        return None
    return int.from_bytes(frame[at:at + width], "little") + (256 if width == 2 else 0)


def plan(array, base: str, where: str) -> ChunkPlan | None:
    """A ChunkPlan for a zarr array whose chain this module decodes; None for anything else."""
    meta = array.metadata
    codecs = tuple(getattr(meta, "codecs", ()))
    one_byte = np.dtype(array.dtype).itemsize == 1  # zarr writes no endianness for these
    if not codecs or codecs[0] not in (BytesCodec(endian="little"), *([BytesCodec(endian=None)] if one_byte else [])):
        return None
    if codecs[-1] != Crc32cCodec():
        return None
    middle = codecs[1:-1]
    if middle and not (len(middle) == 1 and isinstance(middle[0], ZstdCodec) and not middle[0].checksum):
        return None
    chunks = array.chunks
    if tuple(chunks[1:]) != tuple(array.shape[1:]) or array.shards is not None:
        return None
    return ChunkPlan(where, base, int(chunks[0]), tuple(array.shape[1:]), np.dtype(array.dtype).newbyteorder("<"),
                     bool(middle), meta.encode_chunk_key)


def read_ranges(fs, requests: list[tuple[ChunkPlan, int, int]], into: list | None = None) -> list[np.ndarray]:
    """Rows [start, end) of each (plan, start, end), written into `into[k]` where that is an
    array (C-contiguous, of those rows' shape and dtype), else into a new one.

    Each chunk is read and decoded once, on the pool: straight into the output where one request holds all of
    it, else copied from (zstd: from the thread's scratch chunk; uncompressed: from the bytes read). An
    asynchronous filesystem (object stores) fetches every chunk in one concurrent `fs.cat` first; a local one
    reads each chunk in its decoding thread.
    """
    outs = [np.empty((b - a, *p.row_shape), dtype=p.dtype) if o is None else o
            for (p, a, b), o in zip(requests, into or [None] * len(requests), strict=True)]
    users: dict[str, list] = {}  # chunk path -> [(plan, chunk, request, its rows [lo, hi) within the chunk)]
    for k, (p, a, b) in enumerate(requests):
        for c in range(a // p.rows, (b - 1) // p.rows + 1 if b > a else 0):
            users.setdefault(p.path(c), []).append((p, c, k, max(a - c * p.rows, 0), min(b - c * p.rows, p.rows)))
    blobs = fs.cat(list(users), on_error="return") if getattr(fs, "async_impl", False) and users else None

    def one(path: str) -> None:
        p, c = users[path][0][:2]
        try:
            data = blobs[path] if blobs is not None else fs.cat_file(path, start=0, end=p.max_bytes + 1)
            if isinstance(data, BaseException):
                raise data
        except (OSError, KeyError) as e:
            raise CacheCorruptionError(f"{p.where}: chunk {c} cannot be read: {e!r}") from e
        if len(data) > p.max_bytes:
            raise CacheCorruptionError(f"{p.where}: chunk {c} holds more than the {p.max_bytes} bytes a chunk can")
        (_, _, k, lo, hi), *more = users[path]
        if not more and (lo, hi) == (0, p.rows):
            start = c * p.rows - requests[k][1]
            p.decode(data, c, outs[k][start:start + p.rows])
            return
        rows = p.decode(data, c, p.scratch() if p.zstd else None)
        for _, _, k, lo, hi in users[path]:
            start = c * p.rows + lo - requests[k][1]
            outs[k][start:start + hi - lo] = rows[lo:hi]

    # Every task ends before an error is raised: the outputs may be the caller's, reused after a failure.
    tasks = [_pool().submit(one, path) for path in users]
    wait(tasks)
    for task in tasks:
        task.result()
    return outs
