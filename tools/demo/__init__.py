"""The synthetic demo (`make demo`, `python -m tools.demo`): the scene task (`scenes`), the tiny Qwen3-VL that has
learned it (`learned_target`, committed under `assets/`) and the pipeline run end to end (`pipeline`)."""
