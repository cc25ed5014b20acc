"""vLLM (named vllm_client so that the engine-side scripts beside it, run with this folder first on their path,
import vLLM itself), run by its own interpreter (`make setup-vllm`'s `.venv-vllm`, or $DFLASH_VLLM_PYTHON):
`run_vllm` (one request file, one result), `VllmWorker` (a long-lived engine answering batches over its pipes) and
`run_capture` are our side; `vllm_generate.py`, `vllm_worker.py` and `vllm_capture.py`, beside this file, the
engine's."""

import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

from engines.protocol import EngineError

VLLM_PYTHON = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"

# How each engine's model runner feeds the drafter on an M-RoPE target, read from vLLM 0.32's source: the V1
# runner passes axis 0 of the target's M-RoPE ids and also places each context token's keys and values in the slot
# of that position, so the tokens of one image share a slot; the V2 runner (the default where Triton exists) token
# indices, one slot each. On text prompts they agree. (SGLang, when added, feeds token indices.)
RUNNER_POSITIONS = {("vllm", "v1"): "mrope_axis0", ("vllm", "v2"): "sequential"}
RUNNER_SHARED_SLOTS = {("vllm", "v1"): True, ("vllm", "v2"): False}


def vllm_python() -> Path | None:
    """The vLLM interpreter: $DFLASH_VLLM_PYTHON, else the one `make setup-vllm` builds; None if neither."""
    path = Path(os.environ.get("DFLASH_VLLM_PYTHON", VLLM_PYTHON))
    return path if path.exists() else None


def checked_python(python: Path | None) -> Path:
    python = python or vllm_python()
    if python is None:
        raise RuntimeError(f"no vLLM interpreter: run `make setup-vllm` or set DFLASH_VLLM_PYTHON ({VLLM_PYTHON})")
    if not Path(python).is_file():
        raise RuntimeError(f"vLLM interpreter {python} does not exist")
    return Path(python)


ENGINE_ENV = {"VLLM_LOGGING_LEVEL": "WARNING"}
# vLLM's gpu_memory_utilization when none is given: of each GPU for weights and KV cache; on the CPU build, the share
# of the machine's memory for the KV cache (the tiny targets need little, and the machine runs other work).
MEMORY_FRACTION = {"cuda": 0.85, "cpu": 0.08}


def run_vllm(request: dict, python: Path | None = None, timeout: float = 1800) -> dict:
    """Run `vllm_generate.py` on `request` under vLLM's interpreter; its result. Raises RuntimeError with the
    tail of the engine's output if it fails."""
    python = checked_python(python)
    script = Path(__file__).with_name("vllm_generate.py")
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        # Its own working directory: the engine's spawned workers re-import the script, not our packages.
        try:
            proc = subprocess.run([str(python), str(script), str(req), str(res)], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ, **ENGINE_ENV})
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"vLLM did not finish within {timeout} s") from e
        if proc.returncode != 0 or not res.exists():
            raise RuntimeError(f"vLLM failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(res.read_text())


class VllmWorker:
    """An engine-side worker script under vLLM's interpreter (`vllm_worker.py`, which generates, or
    `vllm_capture.py`, which captures hidden states), started once and asked batch after batch over its pipes.
    `config` is the worker's CONFIG; `devices` the GPUs it may use (CUDA_VISIBLE_DEVICES), None for all."""

    def __init__(self, config: dict, python: Path | None = None, devices: list[int] | None = None,
                 log_path: Path | None = None, script: str = "vllm_worker.py"):
        python = checked_python(python)
        self.tmp = tempfile.TemporaryDirectory(prefix="vllm-worker-")
        path = Path(self.tmp.name) / "config.json"
        path.write_text(json.dumps(config))
        env = {**os.environ, **ENGINE_ENV}
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        self.log_path = log_path or Path(self.tmp.name) / "engine.log"
        self.log = open(self.log_path, "w")
        script = Path(__file__).with_name(script)
        # Its own working directory: the engine's spawned workers re-import the script, not our packages.
        # Its own session: a Ctrl-C or a scheduler's SIGTERM reaches us, who finish the window and close it, and
        # not the engine mid-window. It ends by itself when our end of its stdin closes.
        self.proc = subprocess.Popen([str(python), str(script), str(path)], cwd=self.tmp.name, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     start_new_session=True)
        self.info = self._read()["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            self.log.flush()
            raise EngineError(f"the vLLM engine process ended (exit {self.proc.returncode}) before answering; its "
                              f"last words: {last_error(self.log_path.read_text())[:300] or 'none'}")
        return json.loads(line)

    def ask(self, request: dict) -> dict:
        """The worker's answer to `request`; an EngineError naming the engine's failure when it cannot answer at
        all (not a refusal of a prompt, which is an answer)."""
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "fatal" in reply:
            raise EngineError(f"vLLM cannot run this target ({reply['fatal']}); nothing of this window was written")
        return reply

    def generate(self, prompts: list[dict]) -> dict:
        """{"outputs": [{"ids", "finish"} | {"error"}], "seconds"} for `prompts` ({"ids", "images"} each)."""
        return self.ask({"prompts": prompts})

    def capture(self, prompts: list[dict], out: Path) -> dict:
        """{"outputs": [{"file"} | {"error"}], "seconds"}: each prompt's hidden states in a file under `out`."""
        return self.ask({"prompts": prompts, "out": str(Path(out).resolve())})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        self.tmp.cleanup()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def run_capture(request: dict, python: Path | None = None) -> list[dict]:
    """`vllm_capture.py` started for one request (CONFIG's keys and "prompts"); per prompt {"ids": the prompt as the
    engine ran it, images expanded [T], "states": the layers' outputs [T, L, H] in the model's dtype}, or {"error"}
    for one it refused. An EngineError in the engine's words when it cannot run the target."""
    from safetensors.torch import load_file

    config = {k: v for k, v in request.items() if k != "prompts"}
    images = max((len(p.get("images", [])) for p in request["prompts"]), default=0)
    with tempfile.TemporaryDirectory(prefix="vllm-capture-") as tmp, \
            VllmWorker({"images_per_prompt": images, **config}, python, script="vllm_capture.py") as worker:
        reply = worker.capture(request["prompts"], Path(tmp))
        out = []
        for o in reply["outputs"]:
            rows = load_file(o["file"]) if "file" in o else None
            out.append(o if rows is None else {"ids": rows["token_ids"], "states": rows["hidden_states"]})
        return out


def last_error(log: str) -> str:
    """The engine's own reason in a log: its last line naming an error or exception (the `[rank0]:` prefix of its
    workers dropped), else its last line."""
    lines = [re.sub(r"^(\[rank\d+\]:\s*)+", "", line).strip() for line in log.splitlines()]
    return next((line for line in reversed(lines) if re.match(r"[\w.]*(Error|Exception)\b", line)),
                next((line for line in reversed(lines) if line), ""))
