"""Greedy generation with vLLM, run in vLLM's own interpreter: nothing of this project is imported here.

    .venv-vllm/bin/python engines/vllm_generate.py REQUEST.json RESULT.json

REQUEST: {"model": DIR, "prompts": [{"ids": [token ids], "images": [image files]}, ...], "max_tokens": N,
          "stop_token_ids": [...], "banned_token_ids": [...], "dtype": "float32", "max_model_len": N,
          "memory_fraction": 0.08, "enable_prefix_caching": false (absent: vLLM's default),
          "runs": [{"name": "plain", "speculative_config": {...} | null}, ...]}
RESULT:  {"version": vLLM's, "device": "cpu" | "cuda" | ..., "runner": "v1" | "v2",
          "runs": {name: {"outputs": [[token ids], ...], "seconds": generation wall time,
                          "spec_decode": {num_drafts, num_draft_tokens, num_accepted_tokens,
                                          num_accepted_tokens_per_pos}}}}

Prompts go in as token ids and come back as token ids, so nothing is re-tokenised on either side; a prompt with
images carries one image placeholder per image, which vLLM expands itself. The runs share one interpreter, one
after another, each with its own engine. The result is written under a temporary name and renamed, so a killed run
leaves no half-written file.
"""

import gc
import json
import os
import sys
import time


def spec_decode_metrics(llm) -> dict:
    """The engine's own speculative-decoding counters (drafts, draft tokens, accepted tokens, accepted per
    position), as its metrics report them; empty without speculation."""
    out = {}
    for metric in llm.get_metrics():
        if metric.name.startswith("vllm:spec_decode"):
            name = metric.name.removeprefix("vllm:spec_decode_")
            out[name] = list(metric.values) if hasattr(metric, "values") else metric.value
    return out


def engine_prompt(prompt: dict) -> dict:
    from PIL import Image

    out = {"prompt_token_ids": prompt["ids"]}
    if prompt.get("images"):
        out["multi_modal_data"] = {"image": [Image.open(path) for path in prompt["images"]]}
    return out


def make_llm(request: dict, images: int, speculative_config: dict | None):
    from vllm import LLM
    from vllm.platforms import current_platform

    tensor_parallel = request.get("tensor_parallel_size", 1)
    in_process = current_platform.is_cpu() and tensor_parallel == 1
    if in_process:
        # On the CPU the engine core and its one worker run in this process: each process of vLLM's default layout
        # imports vLLM anew (measured here: an engine start of 30 s becomes 12 s). On GPUs its defaults stay, where
        # the engine core's own process overlaps scheduling with the devices' work.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        if speculative_config is not None:
            # The V1 runner writes a DFlash drafter's context tokens that share a cache slot (an image's) with
            # parallel threads, so which one stays is a race unless one thread writes them all: one core then
            # (docs/vllm_cpu_defects.md, section 3). vLLM would take all cores but one.
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(min(os.sched_getaffinity(0)))
    return LLM(model=request["model"], dtype=request.get("dtype", "auto"),
               distributed_executor_backend="uni" if in_process else None,
               max_model_len=request.get("max_model_len", 4096), enforce_eager=True, seed=0, disable_log_stats=False,
               # On the CPU backend this is the share of the machine's memory reserved for the KV cache.
               gpu_memory_utilization=request.get("memory_fraction", 0.08),
               tensor_parallel_size=tensor_parallel,
               limit_mm_per_prompt={"image": images} if images else None, speculative_config=speculative_config,
               enable_prefix_caching=request.get("enable_prefix_caching"))


def sampling_params(request: dict, speculative: bool):
    from vllm import SamplingParams

    # Tokens extraction never lets the target write (image slots, turn headers), pushed out as its generate does
    # (there -inf; an additive -100 here, which no real logit gap comes near). vLLM refuses logit_bias together
    # with speculative decoding, so a speculative run goes without.
    banned = {int(t): -100.0 for t in request.get("banned_token_ids", [])} if not speculative else {}
    return SamplingParams(temperature=0.0, max_tokens=request["max_tokens"],
                          stop_token_ids=request.get("stop_token_ids") or None, detokenize=False,
                          logit_bias=banned or None)


def generate(request: dict, speculative_config: dict | None):
    images = max((len(p.get("images", [])) for p in request["prompts"]), default=0)
    llm = make_llm(request, images, speculative_config)
    params = sampling_params(request, speculative_config is not None)
    prompts = [engine_prompt(p) for p in request["prompts"]]
    started = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    run = {"outputs": [list(o.outputs[0].token_ids) for o in outs], "seconds": time.perf_counter() - started,
           "spec_decode": spec_decode_metrics(llm)}
    runner = "v2" if llm.llm_engine.vllm_config.use_v2_model_runner else "v1"
    del llm
    gc.collect()
    return run, runner


def main(request_path: str, result_path: str) -> None:
    import vllm
    from vllm.platforms import current_platform

    request = json.loads(open(request_path).read())
    result = {"version": vllm.__version__, "device": current_platform.device_type, "runs": {}}
    for spec in request["runs"]:
        result["runs"][spec["name"]], result["runner"] = generate(request, spec.get("speculative_config"))
    tmp = f"{result_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1], sys.argv[2])
