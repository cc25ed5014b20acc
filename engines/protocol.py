"""What every engine adapter shares: how a prompt is handed to an engine, and the error an engine that cannot run
a target raises. Engines run in their own interpreter and are fed and read back through files or pipes: nothing of a
serving engine is imported into this project's environment (docs/design.md)."""

from pathlib import Path


class EngineError(RuntimeError):
    """The engine cannot run the target at all (a kernel's assertion, a dtype its backend lacks): one line, the
    engine's own words."""


def engine_prompt(ids: list[int], images: list, image_token_id: int | None, stem: Path) -> dict:
    """A rendered prompt as the engine script takes it: each image's run of placeholders collapsed to one (vLLM
    expands it again with its own processor) and the images written to `folder` as PNG (lossless: the engine
    reads the pixels extraction saw) as STEM-0.png, STEM-1.png, ..."""
    kept = [t for i, t in enumerate(ids) if t != image_token_id or i == 0 or ids[i - 1] != image_token_id]
    paths = [f"{stem}-{j}.png" for j in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path, format="PNG")
    if kept.count(image_token_id) != len(paths):
        raise ValueError(f"prompt has {kept.count(image_token_id)} image slots but {len(paths)} images")
    return {"ids": kept, "images": paths}
