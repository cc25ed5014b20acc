"""A long-lived vLLM engine answering generation requests, run in vLLM's own interpreter: nothing of this project is
imported here. Extraction's regeneration keeps one per rank for all of its shards, so the engine starts once.

    .venv-vllm/bin/python engines/vllm_worker.py CONFIG.json

CONFIG:  {"model": DIR, "dtype": ..., "max_model_len": N, "memory_fraction": F, "tensor_parallel_size": N,
          "images_per_prompt": N, "max_tokens": N, "stop_token_ids": [...], "banned_token_ids": [...]}
Then one JSON request per line on stdin, {"prompts": [{"ids": [...], "images": [files]}, ...]}, and one answer
per line on stdout, {"outputs": [{"ids": [...], "finish": "stop" | "length"} | {"error": "..."}], "seconds": s}.
The first line written is {"ready": {"version": ..., "device": ..., "runner": ...}}. A prompt the engine refuses
(too long for its context, an image it cannot read) gets an error of its own; the others are answered. When the
engine fails otherwise (it cannot run the model at all), the worker writes {"fatal": "..."} and exits. Every log
line of the engine goes to stderr, so stdout carries only the protocol.
"""

import json
import os
import sys
import time

from vllm_generate import engine_prompt, make_llm, sampling_params


class EngineFailed(Exception):
    """The engine failed on a prompt for a reason of its own, not the prompt's: no other prompt would fare better."""


def refused(e: Exception) -> bool:
    """Whether the engine refused the request itself: its client errors (vLLM >= 0.2x) and the ValueError its
    input checks raise. Anything else (an assertion in a kernel, a dtype the backend lacks) is the engine's."""
    try:
        from vllm.exceptions import VLLMClientError
    except ImportError:  # an older vLLM on the user's host
        return isinstance(e, ValueError)
    return isinstance(e, (ValueError, VLLMClientError))


def message(e: Exception) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def answer(llm, params, prompts: list[dict]) -> list[dict]:
    """Each prompt's greedy answer; when the batch fails, each prompt alone, so one refusal costs only itself."""
    def run(batch):
        return [{"ids": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason}
                for o in llm.generate([engine_prompt(p) for p in batch], params, use_tqdm=False)]

    def alone(prompt) -> list[dict]:
        try:
            return run([prompt])
        except Exception as e:  # noqa: BLE001 - a refusal is the answer, any other failure ends the worker
            if not refused(e):
                raise EngineFailed(message(e)) from e
            return [{"error": message(e)}]

    if len(prompts) == 1:
        return alone(prompts[0])
    try:
        return run(prompts)
    except Exception:  # noqa: BLE001 - which prompt the engine refuses is found below
        return [out for p in prompts for out in alone(p)]


def serve(start, respond) -> None:
    """The worker's protocol: the engine `start()` makes announced ready on stdout, then each request line on stdin
    answered with `respond(llm, request)`'s outputs. A failure of the engine (EngineFailed), or a ValueError of a
    request as a whole, is written as fatal and ends the worker. Every other line the engine prints goes to stderr."""
    protocol = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    import vllm
    from vllm.platforms import current_platform

    llm = start()
    runner = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    ready = {"version": vllm.__version__, "device": current_platform.device_type, "runner": runner}
    protocol.write(json.dumps({"ready": ready}) + "\n")
    protocol.flush()
    for line in sys.stdin:
        request = json.loads(line)
        started = time.perf_counter()
        try:
            reply = {"outputs": respond(llm, request), "seconds": time.perf_counter() - started}
        except (EngineFailed, ValueError) as e:
            reply = {"fatal": str(e)}
        protocol.write(json.dumps(reply) + "\n")
        protocol.flush()
        if "fatal" in reply:
            raise SystemExit(1)


def main(config_path: str) -> None:
    config = json.loads(open(config_path).read())
    serve(lambda: make_llm(config, config.get("images_per_prompt", 0), None),
          lambda llm, request: answer(llm, sampling_params(config, speculative=False), request["prompts"]))


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
