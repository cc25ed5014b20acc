import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory) -> Path:
    """All five tiny target families, built once per test session."""
    from tools.tiny_targets import FAMILIES, build_target

    out = tmp_path_factory.mktemp("targets")
    for family in FAMILIES:
        build_target(family, out)
    return out


@pytest.fixture(scope="session")
def demo_shards(tmp_path_factory) -> list[Path]:
    from tools.demo_shards import write_shards

    return write_shards(tmp_path_factory.mktemp("shards"), shards=2, samples=8)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matrices: extra threads only add synchronisation (tenfold on a busy machine). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
