"""Deterministic toy English used to train the tiny tokenizer and to fill the demo conversations.

Answers come in the layouts real chat data has (one paragraph, paragraphs separated by blank lines, short
lists, now and then a leading newline), so the tokenizer learns whitespace-run merges such as "\\n\\n" the way
the real Qwen vocabularies have them, and the demo conversations exercise those merges at turn boundaries.
"""

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
# Chat-layout words, so that role headers become a few tokens as they are one in the real vocabularies.
ROLES = ("system", "user", "assistant")


def sentence(rng: random.Random, lo: int = 4, hi: int = 14) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(lo, hi))]
    text = " ".join(words)
    return text[0].upper() + text[1:] + rng.choice([".", ".", "?", "!"])


def paragraph(rng: random.Random, sentences: int) -> str:
    return " ".join(sentence(rng) for _ in range(sentences))


def answer(rng: random.Random) -> str:
    """One assistant answer: a paragraph, blank-line separated paragraphs or a list; sometimes a leading newline."""
    layout = rng.choice(["paragraph", "paragraph", "paragraphs", "list"])
    if layout == "paragraph":
        text = paragraph(rng, rng.randint(1, 3))
    elif layout == "paragraphs":
        text = "\n\n".join(paragraph(rng, rng.randint(1, 2)) for _ in range(rng.randint(2, 3)))
    else:
        text = sentence(rng) + "\n" + "\n".join(f"- {sentence(rng, 2, 6)}" for _ in range(rng.randint(2, 4)))
    return ("\n" if rng.random() < 0.25 else "") + text


def training_text(seed: int = 0, lines: int = 3000) -> list[str]:
    rng = random.Random(seed)
    text = []
    for _ in range(lines):
        role = rng.choice(ROLES)
        text.append(f"{role}\n{answer(rng)}\n" if rng.random() < 0.3 else answer(rng))
    return text
