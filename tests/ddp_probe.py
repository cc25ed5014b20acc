"""Run by tests/test_train_loop.py under `accelerate launch`: trains through `train.loop.train` unchanged and
records, per rank, the epoch and sample ids of every training batch it consumed and a digest of its final
weights.

    accelerate launch ... tests/ddp_probe.py OUT_DIR HYDRA_OVERRIDE...
"""

import hashlib
import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import train.loop as loop  # noqa: E402
from train.config import TrainConfig  # noqa: E402, F401  (registers the schema)


def digest(state_dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state_dict):
        h.update(name.encode() + state_dict[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=overrides))
    seen, prepared = [], []
    real_stream, real_prepare = loop.batch_stream, Accelerator.prepare

    def stream(dataset, cfg, state, *args):
        for batch in real_stream(dataset, cfg, state, *args):
            seen.append([state.epoch, batch["sample_ids"].tolist()])
            yield batch

    def prepare(self, *args):
        result = real_prepare(self, *args)
        prepared.append(result[0])
        return result

    loop.batch_stream, Accelerator.prepare = stream, prepare
    loop.train(cfg)
    model = prepared[0]
    weights = getattr(model, "module", model).state_dict()
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank{rank}.json").write_text(json.dumps({"batches": seen, "digest": digest(weights)}))


if __name__ == "__main__":
    main()
