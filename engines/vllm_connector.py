"""vLLM's hidden-states connector made to run on any device, its CPU build's included (engine side: loaded by vLLM
through `kv_connector_module_path`, it imports vLLM and nothing of this project).

vLLM's `extract_hidden_states` method writes the target's chosen layers into a cache-only layer's blocks; its
`ExampleHiddenStatesConnector` copies a finished request's rows from there to a file. That copy goes through pinned
memory, a CUDA stream and events, which the CPU build refuses ("pin_memory=True requires a CUDA or other accelerator
backend"). This one copies synchronously: the rows are on disk when the engine reports the request sent."""

import os

import torch
from safetensors.torch import save_file
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (
    ExampleHiddenStatesConnector, PendingSave, extract_from_kv_cache)


class _Written:
    """Stands in for the CUDA event the example connector polls before it reports a request sent."""

    @staticmethod
    def query() -> bool:
        return True


class HostHiddenStatesConnector(ExampleHiddenStatesConnector):
    """Writes each finished request's `hidden_states` [T, L, H] (the model's dtype) and `token_ids` [T] (the prompt
    as the engine ran it, images expanded) to its file, under a temporary name renamed when whole."""

    def _submit_async_write(self, pending: PendingSave) -> None:
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            if not self._is_tp_rank_zero:
                return
            blocks = torch.tensor(pending.block_ids, dtype=torch.long)
            slots = (blocks[:, None] * self._block_size + torch.arange(self._block_size)).flatten()
            states = extract_from_kv_cache(self._kv_cache, slots.to(self._kv_cache.device), len(pending.token_ids))
            os.makedirs(os.path.dirname(pending.filename) or ".", exist_ok=True)
            tmp = f"{pending.filename}.tmp-{os.getpid()}"
            save_file({"hidden_states": states.cpu().contiguous(), "token_ids": pending.token_ids.clone()}, tmp)
            os.replace(tmp, pending.filename)
            self._req_copy_events[pending.req_id] = _Written()
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases a reader waiting on the lock file, if the engine was told to keep one
