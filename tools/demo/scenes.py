"""A synthetic image-text task whose answers depend on the image: scenes of coloured shapes and digits.

A scene is a 64x64 picture cut into a 2x2 grid of 32-pixel cells (one cell = one merged Qwen3-VL image token
at patch 16, merge 2), with one to four distinct objects in distinct cells. Questions ask for a description,
counts, what is where, where something is, and which digits appear; over one image, two images, several
turns, or no image at all (a little text-only chat).

Every assistant turn has two answers: the *canonical* one, a fixed template filled in from the scene (what
the learned target is trained to write), and a *reference* one, a human-style paraphrase with the same
content in varied wording and order (what the shards carry, as human-written data would). Deterministic for
a seed: samples, image bytes and shard bytes.
"""

import io
import json
import random
from dataclasses import dataclass, field, replace
from pathlib import Path

import webdataset as wds
from PIL import Image, ImageDraw, ImageFont

CELL = 32
GRID = 2
SIZE = CELL * GRID
COLOURS = {"red": (215, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220), "yellow": (225, 195, 20),
           "purple": (145, 55, 185)}
SHAPES = ("circle", "square", "triangle")
DIGITS = tuple("0123456789")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
# The paraphrases' own words for the cells, so reference answers differ from the canonical ones throughout.
LOOSE_POSITIONS = ("upper left corner", "upper right corner", "lower left corner", "lower right corner")
NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight")
ORDINALS = ("first", "second")
KINDS = ("single", "multi_image", "multi_turn", "text")
KIND_WEIGHTS = (0.5, 0.15, 0.2, 0.15)
GREETING = ("Hello! I am a small assistant that describes pictures of coloured shapes and digits. "
            "Send me an image and ask me what is in it.")


@dataclass(frozen=True)
class Obj:
    colour: str
    kind: str  # a shape name or a digit

    @property
    def name(self) -> str:
        return f"{self.colour} {self.kind}" if self.kind in SHAPES else f"{self.colour} digit {self.kind}"


Scene = dict[int, Obj]  # cell index (raster order) -> object


@dataclass
class Sample:
    key: str
    kind: str
    images: list[Image.Image]
    turns: list[dict] = field(default_factory=list)  # {"question", "canonical", "reference", "task"}


def random_object(rng: random.Random) -> Obj:
    return Obj(rng.choice(list(COLOURS)), rng.choice(SHAPES if rng.random() < 0.5 else DIGITS))


def random_scene(rng: random.Random) -> Scene:
    objs: set[Obj] = set()
    n = rng.randint(1, 4)
    while len(objs) < n:
        objs.add(random_object(rng))
    cells = rng.sample(range(GRID * GRID), n)
    return dict(sorted(zip(cells, sorted(objs, key=lambda o: o.name))))


_FONT_CACHE: dict[int, ImageFont.FreeTypeFont] = {}


def _font(size: int) -> ImageFont.FreeTypeFont:
    if size not in _FONT_CACHE:
        _FONT_CACHE[size] = ImageFont.load_default(size=size)
    return _FONT_CACHE[size]


def render(scene: Scene, rng: random.Random) -> Image.Image:
    """The scene on a light background; each object jitters a little in size and place inside its cell."""
    shade = rng.randint(235, 255)
    img = Image.new("RGB", (SIZE, SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(img)
    for cell, obj in scene.items():
        r = rng.randint(9, 12)
        cx = (cell % GRID) * CELL + CELL // 2 + rng.randint(-2, 2)
        cy = (cell // GRID) * CELL + CELL // 2 + rng.randint(-2, 2)
        fill = COLOURS[obj.colour]
        if obj.kind == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        elif obj.kind == "square":
            draw.rectangle((cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1), fill=fill)
        elif obj.kind == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r - 1), (cx + r, cy + r - 1)], fill=fill)
        else:
            draw.text((cx, cy), obj.kind, fill=fill, font=_font(rng.randint(24, 27)), anchor="mm",
                      stroke_width=1, stroke_fill=fill)
    return img


# --- answers -------------------------------------------------------------------------------------------

def _count(n: int, noun: str) -> str:
    return f"{NUMBER_WORDS[n]} {noun}{'' if n == 1 else 's'}"


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _where_to_find(obj: Obj, scene: Scene) -> int | None:
    return next((c for c, o in scene.items() if o == obj), None)


def describe(scene: Scene, where: str = "") -> tuple[str, str]:
    """The canonical description; `where` names the image in multi-image answers."""
    head = f"The {where} image shows" if where else "The image shows"
    body = " ".join(f"At the {POSITIONS[c]} there is a {o.name}." for c, o in scene.items())
    return f"{head} {_count(len(scene), 'object')}. {body}"


def loose_describe(scene: Scene, rng: random.Random, where: str = "") -> str:
    items = [f"a {o.name} in the {LOOSE_POSITIONS[c]}" for c, o in scene.items()]
    rng.shuffle(items)
    n = len(scene)
    pic = f"the {where} picture" if where else rng.choice(["this picture", "the photo", "this image"])
    opener = rng.choice([f"In {pic} I can spot {n} thing{'s' * (n > 1)}: ",
                         f"Looking at {pic}, there's ",
                         f"Sure, {pic} has "])
    return opener + _listing(items) + "."


def _objects_with(scene: Scene, test) -> list[tuple[int, Obj]]:
    return [(c, o) for c, o in scene.items() if test(o)]


def ask_colour_count(scene: Scene, rng: random.Random) -> dict:
    present = sorted({o.colour for o in scene.values()})
    colour = rng.choice(present) if rng.random() < 0.75 else rng.choice(list(COLOURS))
    found = _objects_with(scene, lambda o: o.colour == colour)
    k = len(found)
    if k == 0:
        canon = f"There are no {colour} objects in the image."
        ref = rng.choice([f"I don't see anything {colour} here.", f"Nothing in this picture is {colour}."])
    else:
        verb = "is" if k == 1 else "are"
        canon = (f"There {verb} {_count(k, colour + ' object')}: "
                 + _listing([f"a {o.name} at the {POSITIONS[c]}" for c, o in found]) + ".")
        ref = (f"{NUMBER_WORDS[k].capitalize()} - "
               + _listing([f"the {o.name} ({LOOSE_POSITIONS[c]})" for c, o in found]) + ".")
    q = rng.choice([f"How many {colour} objects are there?", f"How many {colour} things can you see?"])
    return dict(task="count_colour", question=q, canonical=canon, reference=ref)


def ask_count(scene: Scene, rng: random.Random) -> dict:
    names = [f"a {o.name}" for o in scene.values()]
    verb = "is" if len(scene) == 1 else "are"
    canon = f"There {verb} {_count(len(scene), 'object')} in the image: {_listing(names)}."
    rng.shuffle(names)
    ref = f"I count {len(scene)}: {_listing(names)}."
    q = rng.choice(["How many objects are in the image?", "Count the objects in the picture."])
    return dict(task="count", question=q, canonical=canon, reference=ref)


def ask_what_at(scene: Scene, rng: random.Random, where: str = "") -> dict:
    cell = rng.choice(list(scene)) if rng.random() < 0.7 else rng.randrange(GRID * GRID)
    of = f" of the {where} image" if where else ""
    pos = POSITIONS[cell]
    if cell in scene:
        canon = f"At the {pos}{of} there is a {scene[cell].name}."
        ref = rng.choice([f"A {scene[cell].name}.", f"That's a {scene[cell].name}."])
    else:
        canon = f"There is nothing at the {pos}{of}."
        ref = rng.choice(["That spot is empty.", "Nothing, it's blank there."])
    q = rng.choice([f"What is at the {pos}{of}?", f"What can you see at the {pos}{of}?"])
    return dict(task="what_at", question=q, canonical=canon, reference=ref)


def ask_where(scene: Scene, rng: random.Random) -> dict:
    if rng.random() < 0.75:
        obj = rng.choice(list(scene.values()))
    else:
        obj = random_object(rng)
    cell = _where_to_find(obj, scene)
    if cell is None:
        canon = f"There is no {obj.name} in the image."
        ref = f"I can't find a {obj.name} anywhere."
    else:
        canon = f"The {obj.name} is at the {POSITIONS[cell]}."
        ref = rng.choice([f"In the {LOOSE_POSITIONS[cell]}.", f"It's in the {LOOSE_POSITIONS[cell]}."])
    q = rng.choice([f"Where is the {obj.name}?", f"Where can I find the {obj.name}?"])
    return dict(task="where", question=q, canonical=canon, reference=ref)


def ask_digits(scene: Scene, rng: random.Random) -> dict:
    digits = [o.kind for o in scene.values() if o.kind in DIGITS]
    if not digits:
        canon = "There are no digits in the image."
        ref = "No numbers in this one."
    else:
        canon = f"I can see {_count(len(digits), 'digit')}: {_listing(digits)}."
        ref = f"The numbers are {_listing(digits)}."
    q = rng.choice(["Which digits can you see?", "Read the digits in the image."])
    return dict(task="digits", question=q, canonical=canon, reference=ref)


def ask_describe(scene: Scene, rng: random.Random) -> dict:
    q = rng.choice(["Describe the image.", "What do you see in this picture?", "List the objects in the image."])
    return dict(task="describe", question=q, canonical=describe(scene), reference=loose_describe(scene, rng))


SINGLE_QUESTIONS = (ask_describe, ask_count, ask_colour_count, ask_what_at, ask_where, ask_digits)
FOLLOW_UPS = (ask_colour_count, ask_what_at, ask_where, ask_digits)


def two_images(scenes: list[Scene], rng: random.Random) -> dict:
    if rng.random() < 0.5:
        canon = " ".join(describe(s, ORDINALS[i]) for i, s in enumerate(scenes))
        ref = " ".join(loose_describe(s, rng, ORDINALS[i]) for i, s in enumerate(scenes))
        q = rng.choice(["Describe the two images.", "What is in each of these pictures?"])
        return dict(task="describe_two", question=q, canonical=canon, reference=ref)
    if rng.random() < 0.5:
        a, b = (len(s) for s in scenes)
        canon = (f"The first image has {_count(a, 'object')} and the second image has {_count(b, 'object')}.")
        ref = f"{a} in the first one, {b} in the second."
        q = rng.choice(["How many objects are in each image?", "Count the objects in both pictures."])
        return dict(task="count_two", question=q, canonical=canon, reference=ref)
    i = rng.randrange(2)
    return {**ask_what_at(scenes[i], rng, ORDINALS[i]), "task": "what_at_two"}


def text_turn(rng: random.Random) -> dict:
    r = rng.random()
    if r < 0.45:
        a = rng.randint(1, 20)
        b = a + rng.randint(2, 8)
        nums = [str(n) for n in range(a, b + 1)]
        return dict(task="count_range", question=f"Count from {a} to {b}.",
                    canonical=f"Counting from {a} to {b}: {', '.join(nums)}.", reference=" ".join(nums))
    if r < 0.8:
        n = rng.randint(0, 29)
        return dict(task="next_number", question=rng.choice([f"What number comes after {n}?",
                                                             f"Which number follows {n}?"]),
                    canonical=f"The number after {n} is {n + 1}.", reference=f"{n + 1}, of course.")
    if r < 0.9:
        return dict(task="colours", question="Which colours do you know?",
                    canonical=f"I know {_count(len(COLOURS), 'colour')}: {_listing(list(COLOURS))}.",
                    reference="Red, green, blue, yellow, purple.")
    return dict(task="greeting", question=rng.choice(["Hello!", "Hi, who are you?", "What can you do?"]),
                canonical=GREETING, reference="Hi there! Show me a picture and I'll tell you what's in it.")


def make_sample(rng: random.Random, key: str) -> Sample:
    kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
    if kind == "text":
        return Sample(key, kind, [], [text_turn(rng)])
    scenes = [random_scene(rng) for _ in range(2 if kind == "multi_image" else 1)]
    images = [render(s, rng) for s in scenes]
    if kind == "multi_image":
        return Sample(key, kind, images, [two_images(scenes, rng)])
    if kind == "single":
        return Sample(key, kind, images, [rng.choice(SINGLE_QUESTIONS)(scenes[0], rng)])
    first = ask_describe(scenes[0], rng) if rng.random() < 0.6 else ask_count(scenes[0], rng)
    follow = rng.sample(FOLLOW_UPS, rng.randint(1, 2))
    return Sample(key, kind, images, [first] + [f(scenes[0], rng) for f in follow])


def split_seed(split: str, seed: int) -> int:
    # Splits draw from separate streams, so "heldout" never repeats a "train" sample for the same seed.
    return seed * 1_000_003 + sum(ord(c) * 31 ** i for i, c in enumerate(split))


def samples(split: str, n: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(split_seed(split, seed))
    return [make_sample(rng, f"{split}_{seed}_{i:06d}") for i in range(n)]


# --- webdataset records ---------------------------------------------------------------------------------

def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_record(sample: Sample, answers: str = "reference") -> dict:
    """The sample as a webdataset record in the chat `messages` format; `answers`: reference or canonical.

    Images sit in the first user turn, before its text. The record also keeps the canonical answers and the
    task of each turn under `task`, which the pipeline ignores and evaluation reads.
    """
    messages = []
    for t, turn in enumerate(sample.turns):
        parts = [{"type": "image"} for _ in sample.images] if t == 0 else []
        messages.append({"role": "user", "content": parts + [{"type": "text", "text": turn["question"]}]})
        messages.append({"role": "assistant", "content": turn[answers]})
    names = [f"{i}.png" for i in range(len(sample.images))]
    meta = {"messages": messages, "images": names,
            "task": {"kind": sample.kind, "turns": [t["task"] for t in sample.turns],
                     "canonical": [t["canonical"] for t in sample.turns]}}
    record = {"__key__": sample.key, "json": json.dumps(meta).encode()}
    for name, img in zip(names, sample.images):
        record[name] = png_bytes(img)
    return record


def write_task_shards(out_dir: Path, split: str, n_samples: int, seed: int = 0,
                      samples_per_shard: int = 64, scale: int = 1) -> list[Path]:
    """`split-NNNNNN.tar` shards of `n_samples` task samples with reference (human-style) answers; `scale` > 1
    enlarges every image that many times (nearest neighbour: the same scene in scale**2 times the image tokens)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = samples(split, n_samples, seed)
    if scale != 1:
        items = [replace(s, images=[img.resize((SIZE * scale,) * 2, Image.NEAREST) for img in s.images])
                 for s in items]
    paths = []
    for s in range(0, n_samples, samples_per_shard):
        path = out_dir / f"{split}-{s // samples_per_shard:06d}.tar"
        # A fixed mtime makes the tar bytes a function of the samples alone.
        with wds.TarWriter(str(path), mtime=0.0) as sink:
            for sample in items[s:s + samples_per_shard]:
                sink.write(to_record(sample))
        paths.append(path)
    return paths
