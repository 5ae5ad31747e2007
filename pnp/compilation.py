"""torch.compile for the UNet and the VAE decoder: whole graphs, static shapes, and an eager fallback.

A `Compilable` runs its function eagerly until `compile` is called, then under torch.compile with
`fullgraph=True` (a graph break is an error, not a silent split) and `dynamic=False` (one graph per
shape: a request has few). Compilation happens on first use of each shape; if it fails, the function
runs eagerly from then on and a warning says why, so a request never fails for it. After
`stop_compiling`, a shape without a graph runs eagerly while the shapes already compiled keep their
graphs: so a service warmed up on its usual shapes never makes a request wait minutes for a
compilation, and so a function that reaches `COMPILED_GRAPHS_LIMIT` graphs (a service that meets many
image sizes) goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import torch._dynamo
from torch._dynamo.exc import FailOnRecompileLimitHit

logger = logging.getLogger(__name__)

# Graphs torch.compile may keep per function: batch sizes times injection patterns across requests.
COMPILED_GRAPHS_LIMIT = 64


class Compilable:
    """`function`, run eagerly or, after `compile`, under torch.compile (outside an `eager` block)."""

    def __init__(self, function: Callable[..., Any], name: str):
        self.function, self.name = function, name
        self._compiled: Callable[..., Any] | None = None
        self._eager = False
        self._compiling = True

    def compile(self, backend: str | Callable = "inductor") -> None:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_LIMIT)
        self._compiled = torch.compile(self.function, backend=backend, fullgraph=True, dynamic=False)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def stop_compiling(self) -> None:
        """From now on a shape without a graph runs eagerly instead of compiling one; the graphs compiled
        so far stay in use."""
        self._compiling = False

    @contextmanager
    def eager(self) -> Iterator[None]:
        """Run eagerly inside the block (the float32 retry: compiled graphs are for the model's dtype)."""
        self._eager = True
        try:
            yield
        finally:
            self._eager = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._compiled is not None and not self._eager:
            try:
                with nullcontext() if self._compiling else torch.compiler.set_stance("eager_on_recompile"):
                    return self._compiled(*args, **kwargs)
            except FailOnRecompileLimitHit:
                # With fullgraph=True, torch.compile raises at its graph limit instead of running the new
                # shape eagerly; it raises before running anything, so running the call eagerly is safe.
                logger.warning(
                    "the %s reached torch.compile's limit of %d graphs; new shapes run eagerly, compiled ones stay",
                    self.name,
                    torch._dynamo.config.recompile_limit,
                )
                self.stop_compiling()
            except torch._dynamo.exc.TorchDynamoException as error:
                logger.warning("torch.compile of the %s failed (%s); it runs eagerly from now on", self.name, error)
                self._compiled = None
        return self.function(*args, **kwargs)
