"""Benchmark of the engine against SPEC section 5's cost model: run with `python -m bench.run`."""
