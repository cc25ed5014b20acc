"""`python -m train setup=qwen3vl30b data.cache=cache/qwen3vl30b [optim.lr=3e-4 ...]` (Hydra; -m sweeps)."""

import logging

import hydra
from omegaconf import OmegaConf

from cache_schema import CacheError
from cache_schema.stop import STOPPED_EXIT, Stopped
from train.config import TrainConfig  # noqa: F401  (registers the schema)
from train.loop import train


@hydra.main(config_path="../conf", config_name="train", version_base="1.3")
def main(cfg) -> None:
    logging.getLogger("train").setLevel(logging.INFO)
    try:
        state = train(OmegaConf.to_object(cfg))
    except (ValueError, CacheError) as e:  # a user mistake or a bad cache: one line, not a traceback
        raise SystemExit(f"train: {e}") from None
    except Stopped as e:  # preempted: the checkpoint is saved, the scheduler may run the same command again
        print(f"train: {e}", flush=True)
        raise SystemExit(STOPPED_EXIT) from None
    print(f"training done at step {state.step}; checkpoints in {cfg.run_dir}/checkpoints", flush=True)


if __name__ == "__main__":
    main()
