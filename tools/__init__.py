"""Commands users run beside extract and train: `inspect_cache`, `plot_run`, `spec_decode` (with its decoder,
`speculative_decoder`). Test and benchmark fixtures live in `tools.fixtures`, the synthetic demo in `tools.demo`."""
