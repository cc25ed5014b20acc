"""Capture by a serving engine (`generation.capture=engine`): the hidden states of every final sequence computed by
vLLM, in one prefill each, and cached as transformers' capture caches them; the target's weights are never loaded here.

The engine is started again after regeneration (`extract/engine.py`), set up for capture: vLLM's
`extract_hidden_states` method with our connector (`engines/vllm_connector.py`), prefixes never reused, prefills
never chunked. It is fed each sequence's ids with one placeholder per image and the images as PNG, as regeneration
feeds prompts, and returns the states of the sequence as it ran it: a sequence whose ids the engine's processor
expanded otherwise is skipped (`engine_tokens_differ`). Positions, loss masks and counts come from our side
(`extract/capture.py`, the target's structure without weights), the head tensors from the checkpoint's files.
"""

import logging
import tempfile
from pathlib import Path

from safetensors.torch import load_file

from engines import VllmWorker, engine_prompt
from extract.capture import engine_sample
from extract.engine import engine_config, engine_devices
from extract.formats import SkipSample, guarded
from extract.regenerate import Sequence
from extract.target import Target

log = logging.getLogger("extract")


def check_capturable(target: Target, layer_ids: list[int]) -> None:
    """Refuse, before any work, what the engine would capture otherwise than transformers: Qwen3-VL's deepstack
    layers, whose outputs vLLM captures with the visual features already added to image tokens and transformers'
    hooks (the cache's convention, and what the serving engine's drafter path is compared with) before."""
    deepstack = target.traits.deepstack_layers(target.model.config)
    early = [i for i in layer_ids if i < deepstack]
    if early:
        raise ValueError(f"generation.capture=engine: layer ids {early} lie in this target's deepstack layers "
                         f"0..{deepstack - 1}, which vLLM captures with the visual features added to image tokens and "
                         f"transformers without; choose ids from {deepstack} on, or generation.capture=transformers")


class EngineCapture:
    """Sequences -> their cache samples (or the SkipSample of each that cannot be), computed by one long-lived engine
    of this rank. A context manager: the engine ends with it."""

    def __init__(self, cfg, target: Target, layer_ids: list[int], local_rank: int, cuda: bool):
        check_capturable(target, layer_ids)
        config = {**engine_config(cfg, target, cuda), "layer_ids": layer_ids}
        self.target, self.layer_ids = target, layer_ids
        self.image_id = target.special_tokens.get("image_token_id")
        self.worker = VllmWorker(config, cfg.generation.engine_python, engine_devices(cfg, local_rank, cuda),
                                 script="vllm_capture.py")
        log.info("vLLM %s on %s (%s runner) captures the hidden states", self.worker.info["version"],
                 self.worker.info["device"], self.worker.info["runner"])

    def __call__(self, seqs: list[Sequence]) -> list:
        if not seqs:
            return []
        with tempfile.TemporaryDirectory(prefix="engine-capture-") as tmp:
            prompts = [engine_prompt(s.inputs["input_ids"][0].tolist(), s.conv.images[:s.images], self.image_id,
                                     Path(tmp) / str(j)) for j, s in enumerate(seqs)]
            reply = self.worker.capture(prompts, Path(tmp) / "states")
            out = []
            for seq, o in zip(seqs, reply["outputs"]):
                if "error" in o:
                    out.append(SkipSample("engine_refused", o["error"]))
                    continue
                rows = load_file(o["file"])
                try:
                    out.append(guarded("capture_failed", engine_sample, self.target, seq, rows["token_ids"],
                                       rows["hidden_states"], self.layer_ids))
                except SkipSample as skip:
                    out.append(skip)
            return out

    def close(self) -> None:
        self.worker.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
