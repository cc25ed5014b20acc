"""Serving engines, below the stages and the commands: `protocol.py` (what every adapter shares) and one module per
engine (`vllm_client.py`, with the scripts vLLM's interpreter runs beside it: `vllm_generate.py`, `vllm_worker.py`,
`vllm_capture.py` and its connector). Stage one regenerates and captures through them and the serve check serves
through them; they import nothing of ours."""

from engines.protocol import EngineError, engine_prompt
from engines.vllm_client import (MEMORY_FRACTION, RUNNER_POSITIONS, RUNNER_SHARED_SLOTS, VllmWorker, run_vllm,
                                 vllm_python)

# The engines the serve check can run, by name: each takes a request (prompts, runs) and returns their outputs.
ENGINES = {"vllm": run_vllm}

__all__ = ["ENGINES", "EngineError", "MEMORY_FRACTION", "RUNNER_POSITIONS", "RUNNER_SHARED_SLOTS", "VllmWorker",
           "engine_prompt", "run_vllm", "vllm_python"]
