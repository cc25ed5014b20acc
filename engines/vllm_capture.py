"""The target's hidden states captured by vLLM, run in vLLM's own interpreter: nothing of this project is imported here.
A long-lived engine answering capture requests, as `vllm_worker.py` answers generation requests.

    .venv-vllm/bin/python engines/vllm_capture.py CONFIG.json

CONFIG:  {"model": DIR, "dtype": ..., "max_model_len": N, "memory_fraction": F, "tensor_parallel_size": N,
          "images_per_prompt": N, "layer_ids": [decoder layers whose outputs to capture, ours: id i is layer i's]}
Then one JSON request per line on stdin, {"prompts": [{"ids": [...], "images": [files]}, ...], "out": DIR}, and one
answer per line on stdout, {"outputs": [{"file": DIR/I.safetensors} | {"error": "..."}], "seconds": s}: each file holds
"hidden_states" [T, L, H] in the model's dtype for every prompt token and "token_ids" [T], the prompt as the engine
ran it (each image placeholder expanded by vLLM's processor), written under a temporary name and renamed. The first
line written is {"ready": {"version", "device", "runner"}}; a prompt the engine refuses gets an error of its own, a
failure of the engine {"fatal": "..."} and the worker exits (`vllm_worker.py`'s protocol).

One prefill per prompt (one output token, no chunking, no prefix caching): vLLM's `extract_hidden_states`
speculative method keeps the chosen layers' rows of each token in a cache-only layer, and our connector
(`vllm_connector.py`, beside this file) writes a finished request's rows to its file.

What the engine cannot run fails at the first prefill. On vLLM 0.32's CPU build Gated DeltaNet (Qwen3.5) runs in bf16
only and with linear-attention heads of 64 or 128: in fp32 "AssertionError: CPU GDN attention requires BF16.", heads
of 16 "RuntimeError: chunk_gated_delta_rule_cpu: expect head_dim to be multiples of 32.", heads of 32 "RuntimeError:
Unexpected head dim size, 32".
"""

import functools
import json
import os
import sys
import tempfile
from pathlib import Path

from vllm_generate import engine_prompt
from vllm_worker import EngineFailed, message, refused, serve


@functools.cache
def deepstack_layers(model: str) -> int:
    """How many first decoder layers of `model` (a Qwen3-VL's) add visual features to their image tokens."""
    from transformers import AutoConfig

    vision = getattr(AutoConfig.from_pretrained(model), "vision_config", None)
    return len(getattr(vision, "deepstack_visual_indexes", None) or [])


def check_layer_ids(config: dict, prompts: list[dict]) -> None:
    """Refuses image prompts at ids in a Qwen3-VL target's deepstack layers: vLLM captures those layers' outputs with
    the visual features added to their image tokens, transformers' hooks (our cache) before they are added (measured
    on the learned target: relative error about 0.9 at image tokens, 5e-7 elsewhere)."""
    deepstack = deepstack_layers(config["model"])
    early = [i for i in config["layer_ids"] if i < deepstack]
    if early and any(p.get("images") for p in prompts):
        raise ValueError(f"layer ids {early} lie in the deepstack layers 0..{deepstack - 1}, which vLLM captures with "
                         "the visual features added to image tokens and transformers without")


def make_llm(config: dict, out_dir: Path):
    from vllm import LLM
    from vllm.config import KVTransferConfig
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and config.get("tensor_parallel_size", 1) == 1:
        # The engine core and its one worker in this process: each process of vLLM's default layout imports vLLM
        # anew (engine start 30 s against 12 s, vllm_generate.py).
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM's aux layer k is what enters decoder layer k, the output of layer k - 1 (its embedding output is 0).
    aux = [i + 1 for i in config["layer_ids"]]
    speculative = {"method": "extract_hidden_states", "num_speculative_tokens": 1,
                   "draft_model_config": {"hf_config": {"eagle_aux_hidden_state_layer_ids": aux}}}
    transfer = KVTransferConfig(
        kv_connector="HostHiddenStatesConnector", kv_connector_module_path="vllm_connector", kv_role="kv_producer",
        # Each request names its own file; the connector writes it before reporting it sent, so no lock file is
        # needed to wait on.
        kv_connector_extra_config={"shared_storage_path": str(out_dir), "allow_custom_save_path": True,
                                   "use_synchronization_lock": False})
    images = config.get("images_per_prompt", 0)
    max_len = config.get("max_model_len", 4096)
    tensor_parallel = config.get("tensor_parallel_size", 1)
    in_process = current_platform.is_cpu() and tensor_parallel == 1
    return LLM(model=config["model"], dtype=config.get("dtype", "auto"),
               distributed_executor_backend="uni" if in_process else None, tensor_parallel_size=tensor_parallel,
               max_model_len=max_len, enforce_eager=True, seed=0,
               # A whole prompt in one step: its prefill is never chunked.
               max_num_batched_tokens=max_len, enable_prefix_caching=False,
               # On the CPU backend this is the share of the machine's memory reserved for the KV cache.
               gpu_memory_utilization=config.get("memory_fraction", 0.08),
               limit_mm_per_prompt={"image": images} if images else None,
               speculative_config=speculative, kv_transfer_config=transfer)


def write_states(llm, prompts: list[dict], paths: list[Path]) -> None:
    """One prefill of each prompt, its rows written to its path by the connector."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=1, detokenize=False,
                             extra_args={"kv_transfer_params": {"hidden_states_path": str(path)}}) for path in paths]
    llm.generate([engine_prompt(p) for p in prompts], params, use_tqdm=False)
    # A request's rows are written in the engine step after the one that finishes it, which `generate` (done once
    # every output is) does not take for the last requests: step the engine until it has written them.
    for _ in range(16):
        if all(path.exists() for path in paths):
            return
        llm.llm_engine.step()
    missing = [path.name for path in paths if not path.exists()]
    raise RuntimeError(f"the engine wrote no hidden states for {', '.join(missing)}")


def answer(llm, request: dict) -> list[dict]:
    """Each prompt's file; when the batch fails, each prompt alone, so one refusal costs only itself."""
    out = Path(request["out"])
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{i}.safetensors" for i in range(len(request["prompts"]))]

    def alone(prompt, path) -> dict:
        try:
            write_states(llm, [prompt], [path])
        except Exception as e:  # noqa: BLE001 - a refusal is the answer, any other failure ends the worker
            if not refused(e):
                raise EngineFailed(message(e)) from e
            return {"error": message(e)}
        return {"file": str(path)}

    try:
        write_states(llm, request["prompts"], paths)
        return [{"file": str(path)} for path in paths]
    except Exception:  # noqa: BLE001 - which prompt the engine refuses is found below
        return [alone(p, path) for p, path in zip(request["prompts"], paths)]


def main(config_path: str) -> None:
    config = json.loads(open(config_path).read())

    def respond(llm, request: dict) -> list[dict]:
        check_layer_ids(config, request["prompts"])
        return answer(llm, request)

    with tempfile.TemporaryDirectory(prefix="vllm-capture-") as tmp:
        serve(lambda: make_llm(config, Path(tmp)), respond)


if __name__ == "__main__":  # vLLM starts its engine in a spawned process, which re-imports this file
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
