"""Long-lived objects are hidden from the collector's full collections, and still freed
once they are garbage."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry

from model.checkpoint import load_model_folder, rewrite_calibration
from service import products
from service.app import create_app
from service.gc_freeze import freeze_long_lived_objects
from service.metrics import WorkerMetrics
from service.presence import MemoryPresenceBoard
from service.settings import Settings


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


class _Cycle:
    """An object only the collector frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


def test_an_object_frozen_earlier_is_freed_once_it_is_garbage() -> None:
    cycle = _Cycle()
    alive = weakref.ref(cycle)
    freeze_long_lived_objects()
    assert gc.get_freeze_count() > 0
    del cycle
    gc.collect()
    assert alive() is not None  # frozen: a full collection does not look at it
    freeze_long_lived_objects()
    assert alive() is None


def test_the_api_freezes_what_it_holds_once_started(tiny_model_dir: Path) -> None:
    with TestClient(create_app(Settings(model_dir=tiny_model_dir))) as client:
        assert client.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > 0


def test_a_worker_freezes_again_only_when_its_models_change(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = Path(shutil.copytree(tiny_model_dir / "widget", tmp_path / "widget"))
    served = products.ServedProducts(
        Settings(model_dir=tmp_path),
        MemoryPresenceBoard(),
        WorkerMetrics(CollectorRegistry()),
        "worker-1",
    )
    freezes: list[None] = []
    monkeypatch.setattr(products, "freeze_long_lived_objects", lambda: freezes.append(None))

    async def serve(product: str) -> None:
        pass

    asyncio.run(served.reload(serve))
    assert len(freezes) == 1  # the model loaded
    asyncio.run(served.reload(serve))
    assert len(freezes) == 1  # nothing changed
    loaded = load_model_folder(folder)
    raised = loaded.calibration.model_copy(update={"threshold": loaded.calibration.threshold + 1})
    rewrite_calibration(folder, raised, loaded.references)
    asyncio.run(served.reload(serve))
    assert len(freezes) == 2  # the model was replaced
