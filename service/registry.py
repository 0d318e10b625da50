"""Product folders under MODEL_DIR and the Inspectors loaded from them."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from model.checkpoint import FILES, CheckpointError
from model.compiled import compile_inspector
from model.inspector import Inspector
from model.pipeline import inference_dtype
from service.settings import PRODUCT_PATTERN

log = logging.getLogger(__name__)

# (file name, mtime in ns, size) of each checkpoint file; None where a file is missing.
Signature = tuple[tuple[str, int, int] | None, ...]


@dataclass(frozen=True)
class LoadedModel:
    product: str
    inspector: Inspector
    signature: Signature


def signature(folder: Path) -> Signature:
    """What changes when any checkpoint file of the folder is rewritten."""
    stats: list[tuple[str, int, int] | None] = []
    for name in FILES:
        try:
            stat = (folder / name).stat()
        except OSError:
            stats.append(None)
            continue
        stats.append((name, stat.st_mtime_ns, stat.st_size))
    return tuple(stats)


def cpu_inference_threads(lanes: int) -> int:
    """PyTorch threads for each of `lanes` batches run at once on the CPU: the cores this
    process may use, shared out. Lanes, rather than more threads per batch, keep the cores
    busy beside the service's own decoding, heatmaps and HTTP: a parallel step waits for
    its slowest thread, and that thread is the one the other work descheduled. On 2 cores,
    with the demo model, Inspector.inspect made 49 images/s on two threads from the main
    thread, 30 from an inference thread, and 62 as two lanes of one thread each."""
    return max(1, len(os.sched_getaffinity(0)) // lanes)


class Registry:
    """Loads every valid product folder; `refresh` picks up new and changed ones.

    Blocking (PyTorch loads and warms up): call `refresh` in a thread. It never mutates
    a mapping it returned, so an Inspector in use by a batch is swapped out, not altered.
    """

    def __init__(
        self, model_dir: Path, device: str, compile_up_to: int | None = None, lanes: int = 1
    ) -> None:
        self.model_dir = model_dir
        self.device = device
        # Compile each model for batches up to this size (model.compiled); None = eager.
        self.compile_up_to = compile_up_to
        self.dtype = inference_dtype(device)
        if device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            torch.set_num_threads(cpu_inference_threads(lanes))
        self.models: Mapping[str, LoadedModel] = {}
        # The signature a folder had when it last failed to load: retried once it changes.
        self._failed: dict[str, Signature] = {}
        self._ignored: set[str] = set()

    def _folders(self) -> dict[str, Path]:
        if not self.model_dir.is_dir():
            return {}
        folders = {}
        for path in sorted(self.model_dir.iterdir()):
            if not path.is_dir():
                continue
            if re.fullmatch(PRODUCT_PATTERN, path.name) is None:
                if path.name not in self._ignored:
                    log.warning("ignoring %s: not a product name (%s)", path, PRODUCT_PATTERN)
                    self._ignored.add(path.name)
                continue
            folders[path.name] = path
        return folders

    def _load(self, product: str, folder: Path, sig: Signature) -> LoadedModel | None:
        try:
            inspector = self._ready(product, folder)
        except CheckpointError as error:
            log.error("cannot load product %s: %s", product, error)
        except Exception:
            # A folder the checkpoint checks let through but PyTorch cannot run must not
            # stop the other products from being served.
            log.exception("cannot load product %s from %s", product, folder)
        else:
            log.info("loaded product %s, model %s from %s", product, inspector.version, folder)
            return LoadedModel(product, inspector, sig)
        self._failed[product] = sig
        return None

    def _ready(self, product: str, folder: Path) -> Inspector:
        """The folder's Inspector, warmed up, compiled first where asked (COMPILE)."""
        inspector = Inspector.load(folder, device=self.device, dtype=self.dtype)
        if self.compile_up_to is not None:
            try:
                # Captured here, before the new model replaces the old one or is announced.
                compile_inspector(inspector, self.compile_up_to)
                return inspector
            except Exception:
                # A compiler that fails on this host must not take the product down; the
                # eager parts are back in place.
                log.exception("product %s: compiling failed; serving it uncompiled", product)
        inspector.warm_up()
        return inspector

    def refresh(self) -> Mapping[str, LoadedModel]:
        """Load new and changed folders, drop removed ones; returns the new mapping."""
        current = dict(self.models)
        folders = self._folders()
        for product in set(current) - set(folders):
            log.info("product %s: folder removed, no longer served", product)
            del current[product]
        for product, folder in folders.items():
            sig = signature(folder)
            loaded = current.get(product)
            if (loaded and loaded.signature == sig) or self._failed.get(product) == sig:
                continue
            fresh = self._load(product, folder, sig)
            if fresh is not None:
                # A changed folder that fails to load leaves the previous model serving.
                current[product] = fresh
                self._failed.pop(product, None)
        self.models = current
        return current
