"""Benchmark of the engine against the cost model (docs/cost-model.md): run with `python -m bench.run`."""
