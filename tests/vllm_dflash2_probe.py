"""Run by vLLM's interpreter (tests/test_vllm_dflash2.py): builds vLLM's own DFlash2 drafter class from our exports,
loads our weights into it and runs its CPU code for the unary candidates, the selector's scores and the grouped
convolution. Nothing is served: vLLM's CPU build runs the V1 model runner, which refuses DFlash2 drafts, so the probe
lifts that one check for loading alone, and stops before the Triton-only walk (it walks the scores greedily itself,
as the V2 runner's kernel does at temperature 0).

    python vllm_dflash2_probe.py TARGET_DIR DFLASH_EXPORT SPECULATORS_EXPORT INPUTS.pt OUT.pt
"""

import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm.config import VllmConfig, set_current_vllm_config  # noqa: E402
from vllm.distributed import ensure_model_parallel_initialized, init_distributed_environment  # noqa: E402
from vllm.engine.arg_utils import EngineArgs  # noqa: E402
from vllm.model_executor.model_loader import get_model_loader  # noqa: E402
from vllm.model_executor.model_loader.utils import process_weights_after_loading  # noqa: E402
from vllm.utils.torch_utils import set_default_torch_dtype  # noqa: E402
from vllm.v1.worker.cpu_model_runner import _set_torch_accelerator_to_noop  # noqa: E402

STACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def engine_config(target: str, draft: str, tokens: int) -> VllmConfig:
    return EngineArgs(model=target, skip_tokenizer_init=True, dtype="float32", enforce_eager=True, max_model_len=256,
                      max_num_seqs=4, speculative_config={"method": "dflash", "model": draft,
                                                          "num_speculative_tokens": tokens}).create_engine_config()


def mismatches(model, export: str) -> list[str]:
    """Names of our tensors that did not land unchanged in vLLM's parameters (q/k/v and gate/up stacked)."""
    ours = load_file(os.path.join(export, "model.safetensors"))
    params = dict(model.named_parameters())
    bad = []
    for name, param in params.items():
        if not name.startswith("model."):
            continue
        key = name.removeprefix("model.")
        parts = next(((fused, keys) for fused, keys in STACKED.items() if f".{fused}." in key), None)
        if parts:
            want = torch.cat([ours[key.replace(parts[0], k)] for k in parts[1]])
        elif key in ours:
            want = ours[key]
        else:
            continue  # vLLM's own (the mask embedding, the target's embedding it shares)
        if param.shape != want.shape or not torch.equal(param.float(), want.float()):
            bad.append(key)
    covered = {k for n in params for k in [n.removeprefix("model.")]}
    for key in ours:
        fused = next((key.replace(k, f) for f, ks in STACKED.items() for k in ks if f".{k}." in key), key)
        if fused not in covered:
            bad.append(f"{key} (no such parameter)")
    return bad


def main(target: str, dflash_export: str, speculators_export: str, inputs: str, out: str) -> None:
    VllmConfig._is_dflash_candidate_draft = lambda self: False  # the V1 runner's refusal, lifted for loading only
    _set_torch_accelerator_to_noop()
    x = torch.load(inputs)
    block = x["h"].shape[1] + 1
    spec = engine_config(target, speculators_export, block - 1).speculative_config.draft_model_config.hf_config
    vc = engine_config(target, dflash_export, block - 1)
    draft = vc.speculative_config.draft_model_config
    fd, path = tempfile.mkstemp()
    os.close(fd)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, distributed_init_method=f"file://{path}",
                                     backend="gloo")
        ensure_model_parallel_initialized(1, 1)
        loader = get_model_loader(vc.load_config)
        with set_default_torch_dtype(draft.dtype), torch.device("cpu"):
            model = loader.create_model(vllm_config=vc, model_config=draft)
        loader.load_weights(model, draft)
        bad = mismatches(model, dflash_export)  # before the CPU repacking empties the linear weights
        with torch.no_grad():  # serving shares the target's head with an export that ships none, as ours do
            model.lm_head.weight[:x["lm_head"].shape[0]] = x["lm_head"]
        process_weights_after_loading(model, draft, torch.device("cpu"))
        model.eval()
        with torch.no_grad():
            h = x["h"]  # [N, B-1, H]: slots 1..B-1
            n, steps, hidden = h.shape
            cand, unary = model.compute_candidates(h.reshape(-1, hidden))
            k = cand.shape[-1]
            scores = model.model.candidate_selector(cand.view(n, steps, k), unary.view(n, steps, k), h,
                                                    x["anchors"])
            path = []
            for b in range(n):
                prev, row = 0, []
                for s in range(steps):
                    j = int(scores[b, s, prev].argmax())
                    row.append(int(cand.view(n, steps, k)[b, s, j]))
                    prev = j
                path.append(row)
            conv = model.model.layers[0].attention_conv
            y, coef = conv.prepare(x["conv_in"])
            z = conv.finish(x["conv_in"] * 2, coef)
    torch.save({"mismatched": bad, "architectures": list(draft.architectures),
                "dflash_config": dict(draft.hf_config.dflash_config),
                "speculators_dflash_config": dict(spec.dflash_config),
                "speculators_architectures": list(spec.architectures), "path": torch.tensor(path),
                "conv_prepare": y, "conv_finish": z}, out)


if __name__ == "__main__":
    main(*sys.argv[1:6])
