"""Models shared by many runs in one process (`subjectops benchmark run`): each base pipeline and each set of metric
encoders is loaded once, then served from memory.

While a `SharedModels` is active (`with shared.active():`), `models.loading.load_pipeline` hands out a deep copy of
the pipeline it loaded first for the same weights and dtype (finetune trains its pipeline in place, so every run
needs its own, and a copy in memory costs a fraction of a load from disk), and the evaluator takes the encoders
loaded first for the same evaluation settings (they never train, so one instance serves every run). Outside it,
every load reads the disk, as `subjectops run` always has.
"""

from __future__ import annotations

import copy
from collections import Counter
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Hashable, Iterator, Optional

_ACTIVE: ContextVar[Optional[SharedModels]] = ContextVar("subjectops_shared_models", default=None)


class SharedModels:
    def __init__(self) -> None:
        self._pipelines: dict[Hashable, Any] = {}
        self._encoders: dict[Hashable, Any] = {}
        self.loads: Counter = Counter()  # ("pipeline" | "encoders", key) -> loads from disk (1 each when shared)

    def pipeline(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """A private copy of the pipeline `load()` gives for `key` (loaded on the first call only)."""
        if key not in self._pipelines:
            self._pipelines[key] = load()
            self.loads["pipeline", key] += 1
        return copy.deepcopy(self._pipelines[key])

    def encoders(self, key: Hashable, load: Callable[[], Any]) -> Any:
        """The one instance of the encoders `load()` gives for `key`."""
        if key not in self._encoders:
            self._encoders[key] = load()
            self.loads["encoders", key] += 1
        return self._encoders[key]

    @contextmanager
    def active(self) -> Iterator[SharedModels]:
        token = _ACTIVE.set(self)
        try:
            yield self
        finally:
            _ACTIVE.reset(token)


def shared_models() -> Optional[SharedModels]:
    """The active `SharedModels`, or None (every load reads the disk)."""
    return _ACTIVE.get()
