"""Conversations into windows (bounded by decoded pixels) and length-sorted batches, the same on every read."""

from itertools import islice

from extract.formats import Conversation

# Decoded pixels one sort window may hold (RGB: 3 bytes each, about 1.5 GB): past it the window is cut short.
WINDOW_PIXELS = 500_000_000


def batched(iterable, n):
    it = iter(iterable)
    while batch := list(islice(it, n)):
        yield batch


def text_length(conv: Conversation) -> int:
    return sum(len(part.get("text", "")) for m in conv.messages for part in m["content"])


def windows(convs, size: int, max_pixels: int = WINDOW_PIXELS):
    """Runs of `size` conversations, cut short where their decoded images reach `max_pixels`: a window holds
    its images decoded, so its memory is bounded by what the budget allows, not by what the data declares."""
    pool, pixels = [], 0
    for conv in convs:
        pool.append(conv)
        pixels += sum(img.width * img.height for img in conv.images)
        if len(pool) == size or pixels >= max_pixels:
            yield pool
            pool, pixels = [], 0
    if pool:
        yield pool


def length_sorted_batches(convs, batch_size: int, window: int, max_pixels: int = WINDOW_PIXELS):
    """Batches of `batch_size` from windows of `window` batches (fewer where their images reach `max_pixels`),
    each window sorted by text length (the dataset answers' length stands in for the regenerated ones');
    deterministic, so every run writes the same order."""
    for pool in windows(convs, batch_size * window, max_pixels):
        if window > 1:
            pool.sort(key=text_length)
        yield from batched(pool, batch_size)
