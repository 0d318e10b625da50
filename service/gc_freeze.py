"""Keeps the garbage collector's full collections short in a long-running process."""

from __future__ import annotations

import gc


def freeze_long_lived_objects() -> None:
    """Hide every object alive now (modules, the app, loaded models) from the collector,
    after one full collection that frees what an earlier call froze and is garbage now (a
    replaced model). Otherwise each full collection walks them all: 130 ms in the API
    process, during which its event loop answers nobody."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
