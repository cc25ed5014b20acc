import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo  # noqa: F401  sets TORCHINDUCTOR_CACHE_DIR once, on import (a torch optimizer's first use
# imports it): imported here, before any test's snapshot, so the guard does not blame whichever test comes first

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _global_state() -> dict:
    """The process-global state no test (and no library function it calls) may leave changed."""
    root = logging.getLogger()
    return {"torch thread count": torch.get_num_threads(), "torch default dtype": torch.get_default_dtype(),
            "torch global RNG": torch.get_rng_state(), "numpy global RNG": np.random.get_state()[1].tobytes(),
            "python random state": random.getstate(), "working directory": os.getcwd(),
            "environment": {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}, "root logger level": root.level,
            "root logger handlers": list(root.handlers), "grad mode": torch.is_grad_enabled()}


def _restore(state: dict) -> None:
    torch.set_num_threads(state["torch thread count"])
    torch.set_default_dtype(state["torch default dtype"])
    torch.set_rng_state(state["torch global RNG"])
    random.setstate(state["python random state"])
    os.chdir(state["working directory"])
    for k in set(os.environ) - set(state["environment"]) - {"PYTEST_CURRENT_TEST"}:
        del os.environ[k]
    os.environ.update(state["environment"])
    root = logging.getLogger()
    root.setLevel(state["root logger level"])
    root.handlers[:] = state["root logger handlers"]
    torch.set_grad_enabled(state["grad mode"])


def _differs(a, b) -> bool:
    if torch.is_tensor(a):
        return not torch.equal(a, b)
    return a != b


@pytest.fixture(autouse=True)
def global_state_guard(request):
    """Fails a test that leaves process-global state changed, naming what changed, and puts it back so that
    the tests after it run as they would alone."""
    before = _global_state()
    np_before = np.random.get_state()
    yield
    after = _global_state()
    changed = [k for k in before if _differs(before[k], after[k])]
    if "environment" in changed:
        env_a, env_b = before["environment"], after["environment"]
        keys = sorted(k for k in set(env_a) | set(env_b) if env_a.get(k) != env_b.get(k))
        changed[changed.index("environment")] = f"environment ({', '.join(keys)})"
    _restore(before)
    np.random.set_state(np_before)
    if changed:
        pytest.fail(f"{request.node.nodeid} left process-global state changed: {', '.join(changed)}",
                    pytrace=False)


# The modules that take longest (`pytest --durations`), first: `make test` hands whole modules to two processes in
# collection order, and the longest ones last would leave one process working alone at the end.
LONGEST_FIRST = ("test_vllm.py", "test_learned_chain.py", "test_vllm_qwen35.py", "test_faults.py",
                 "test_vllm_capture.py", "test_train_loop.py")


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: LONGEST_FIRST.index(item.path.name) if item.path.name in LONGEST_FIRST
               else len(LONGEST_FIRST))


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory) -> Path:
    """All five tiny target families, built once per test session."""
    from tools.fixtures.tiny_targets import FAMILIES, build_target

    out = tmp_path_factory.mktemp("targets")
    for family in FAMILIES:
        build_target(family, out)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> list[Path]:
    from tools.fixtures.demo_shards import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"), shards=2, samples=8)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra threads only add synchronisation (tenfold on a busy machine). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
