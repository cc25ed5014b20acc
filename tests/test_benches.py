"""The GPU script's CPU dry run: the same code at tiny shapes, so that a short GPU slot is not lost to a bug."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow  # about 45 s: five child processes, two tiny targets built (`make test-all`)
def test_the_gpu_script_runs_every_part_at_tiny_shapes_on_the_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry-run", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert [s["architecture"] for s in result["steps"]] == ["dflash", "dflash2"]
    assert all("error" not in s and s["step_s"] > 0 and s["tflops"] > 0 for s in result["steps"])
    assert result["loader"]["workers"] == 2 and result["loader"]["tokens_per_s"] > 0
    assert {k: v["exit"] for k, v in result["extract"].items()} == {"capture": 0, "generate": 0}
    rows = (tmp_path / "gpu_rows.md").read_text()
    assert "| dflash | small | 256 | 16 x 8 |" in rows and "| dflash2 | small |" in rows
    assert "overhead" in rows and "| input order |" in rows
