"""Deterministic toy English used to train the tiny tokenizer and to fill the demo conversations."""

import random

WORDS = (
    "the a an this that red blue green small large old new cat dog bird car tree house river mountain "
    "picture image photo shows contains left right top bottom center near far behind front two three "
    "many some people person man woman child sitting standing walking running holding looking wearing "
    "table chair window door road street sky cloud sun water boat field grass flower light dark bright "
    "what where how why which who is are was were has have there here with without on in under over "
    "and or but because describe explain count answer question yes no color shape number about of to "
    "for from it its they them we you i see think know say tell give one more most very quite"
).split()


def sentence(rng: random.Random, lo: int = 4, hi: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!"])


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def training_text(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    return [paragraph(rng, rng.randint(1, 4)) for _ in range(lines)]
