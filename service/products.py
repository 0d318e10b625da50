"""The products one worker serves: its registry's models, kept live on the presence board
by a heartbeat, and described by glad_model_info.

Blocking work (loading models) runs in a thread; the rest runs on the worker's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping

from service.gc_freeze import freeze_long_lived_objects
from service.metrics import WorkerMetrics
from service.presence import PresenceBoard
from service.registry import LoadedModel, Registry
from service.settings import Settings
from service.wire import Presence

log = logging.getLogger(__name__)

# A failed announcement is tried again after at most this long.
HEARTBEAT_RETRY_S = 1.0


class ServedProducts:
    """Reloads MODEL_DIR, announces what it holds and withdraws what it no longer serves."""

    def __init__(
        self, settings: Settings, presence: PresenceBoard, metrics: WorkerMetrics, worker_id: str
    ) -> None:
        compile_up_to = settings.max_batch if settings.compiled else None
        self._registry = Registry(
            settings.model_dir, settings.device, compile_up_to, settings.lanes
        )
        self._presence = presence
        self._metrics = metrics
        self._worker_id = worker_id
        self._ttl_s = settings.heartbeat_ttl_s
        self._reload_interval_s = settings.reload_interval_s
        # glad_model_info's labels per product, to remove them when the model changes.
        self._info: dict[str, tuple[str, str, str, str]] = {}

    @property
    def models(self) -> Mapping[str, LoadedModel]:
        return self._registry.models

    def presences(self) -> list[Presence]:
        return [
            Presence(
                product=product,
                worker=self._worker_id,
                version=model.inspector.version,
                image_size=model.inspector.config.image_size,
                preset=model.inspector.config.preset,
                threshold=model.inspector.calibration.threshold,
                device=self._registry.device,
                memory_patches=model.inspector.memory_patches,
            )
            for product, model in self.models.items()
        ]

    async def announce(self) -> None:
        await self._presence.announce(self.presences(), self._ttl_s)

    async def heartbeat(self) -> None:
        """Announce three times per TTL, until cancelled."""
        while True:
            try:
                await self.announce()
                pause = self._ttl_s / 3
            except Exception as error:
                log.warning("cannot announce products: %s", error)
                # Soon again: a Redis that restarts from its append-only file holds this
                # worker's last presences, which expire before a full pause is over.
                pause = min(self._ttl_s / 3, HEARTBEAT_RETRY_S)
            await asyncio.sleep(pause)

    async def reload(self, serve: Callable[[str], Awaitable[None]]) -> None:
        """Load new and changed folders (in a thread: PyTorch blocks) and withdraw the
        products whose folder went, without stopping the others; `serve` makes sure each
        product is served before it is announced."""
        before = {presence.product: presence for presence in self.presences()}
        served = dict(self._registry.models)
        models = await asyncio.to_thread(self._registry.refresh)
        if models.keys() != served.keys() or any(models[p] is not served[p] for p in models):
            freeze_long_lived_objects()  # a model was loaded, replaced or dropped
        for product, presence in before.items():
            if product not in models:
                self._metrics.model_info.remove(*self._info.pop(product))
                await self._presence.withdraw(presence, forget=True)
        for product, model in models.items():
            self._describe(product, model)
            await serve(product)
        # Announce now, so a new product is live before the next heartbeat.
        await self.announce()

    async def watch(self, stopping: asyncio.Event, serve: Callable[[str], Awaitable[None]]) -> None:
        """Reload every RELOAD_INTERVAL_S until stopping is set."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self._reload_interval_s)
            if stopping.is_set():
                break
            try:
                await self.reload(serve)
            except Exception:
                # The models already loaded keep serving; the next poll tries again.
                log.exception("reloading %s failed", self._registry.model_dir)

    def _describe(self, product: str, model: LoadedModel) -> None:
        m = self._metrics
        config = model.inspector.config
        info = (product, model.inspector.version, str(config.image_size), config.preset)
        if self._info.get(product) == info:
            return
        if product in self._info:
            m.model_info.remove(*self._info[product])
        else:
            # Counters start at 0, so rates and alerts see the product at once.
            for counter in (m.inspected, m.anomalous, m.dead_letter, m.duplicate_answers):
                counter.labels(product)
        m.model_info.labels(*info).set(1)
        self._info[product] = info

    async def withdraw_all(self) -> None:
        """On the way out: the API sees at once that this worker no longer serves."""
        for presence in self.presences():
            with contextlib.suppress(Exception):
                await self._presence.withdraw(presence, forget=False)
