"""Serving engines run in their own interpreter, fed and read back through files (DESIGN: nothing of a serving
engine is imported into this project's environment). `run_vllm` is our side; `vllm_generate.py` the engine's."""

import json
import os
import subprocess
import tempfile
from pathlib import Path

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def vllm_python() -> Path | None:
    """The vLLM interpreter: $DFLASH_VLLM_PYTHON, else the one `make setup-vllm` builds; None if neither."""
    path = Path(os.environ.get("DFLASH_VLLM_PYTHON", VLLM_PYTHON))
    return path if path.exists() else None


def run_vllm(request: dict, python: Path | None = None, timeout: float = 1800) -> dict:
    """Run `vllm_generate.py` on `request` under vLLM's interpreter; its result. Raises RuntimeError with the
    tail of the engine's output if it fails."""
    python = python or vllm_python()
    if python is None:
        raise RuntimeError(f"no vLLM interpreter: run `make setup-vllm` or set DFLASH_VLLM_PYTHON ({VLLM_PYTHON})")
    script = Path(__file__).with_name("vllm_generate.py")
    with tempfile.TemporaryDirectory(prefix="vllm-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        # Its own working directory: the engine's spawned workers re-import the script, not our packages.
        try:
            proc = subprocess.run([str(python), str(script), str(req), str(res)], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout, env={**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"})
        except subprocess.TimeoutExpired as e:
            raise RuntimeError(f"vLLM did not finish within {timeout} s") from e
        if proc.returncode != 0 or not res.exists():
            raise RuntimeError(f"vLLM failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}")
        return json.loads(res.read_text())
