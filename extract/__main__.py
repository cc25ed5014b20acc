"""`python -m extract out=CACHE data.shards='shards/train-{000000..000009}.tar' target=qwen3vl30b ...`"""

import logging

import hydra
from omegaconf import OmegaConf

from cache_schema import CacheError
from cache_schema.stop import STOPPED_EXIT, Stopped
from extract.config import ExtractConfig  # noqa: F401  (registers the schema)
from extract.run import run
from engines import EngineError


@hydra.main(config_path="../conf", config_name="extract", version_base="1.3")
def main(cfg) -> None:
    logging.getLogger("extract").setLevel(logging.INFO)
    try:
        run(OmegaConf.to_object(cfg))
    except (ValueError, CacheError, EngineError) as e:  # a mistake, a bad cache, an unservable target: one line
        raise SystemExit(f"extract: {e}") from None
    except Stopped as e:  # preempted: committed shards stay, the same command resumes
        print(f"extract: {e}", flush=True)
        raise SystemExit(STOPPED_EXIT) from None


if __name__ == "__main__":
    main()
