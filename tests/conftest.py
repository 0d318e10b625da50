"""Shared fixtures: a tiny GLAD model, really trained once per test run (once for all of
its pytest-xdist workers)."""

from __future__ import annotations

import os
import shutil
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
from filelock import FileLock

from model.config import GladConfig
from model.demo import demo_config
from model.train import train
from tests.images import write_good_folder

TINY_PRODUCT = "widget"


def tiny_config(steps: int = 150) -> GladConfig:
    """The demo model at half its training steps: it still finds a painted defect by a wide
    margin (damaged parts' lowest score 3.9 above the clean parts' highest), in about 50 s
    on this machine's two cores, half of what 300 steps take."""
    return demo_config(steps)


@pytest.fixture(scope="session", autouse=True)
def _records_in_a_temporary_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Services that tests start (in this process or as subprocesses) keep their records
    and images in this run's temporary folder, not in the checkout's data/."""
    os.environ["DATA_DIR"] = str(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def shared_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for this run's session fixtures, shared by its pytest-xdist workers."""
    own = tmp_path_factory.getbasetemp()
    return own.parent if os.environ.get("PYTEST_XDIST_WORKER") else own


def made_once(folder: Path, make: Callable[[Path], None]) -> Path:
    """`folder`, made by make(a folder) in whichever worker asks first; the others wait for
    it rather than make their own (training twice at once took twice as long)."""
    with FileLock(f"{folder}.lock"):
        if not folder.exists():
            partial = folder.with_name(f"{folder.name}.partial")
            shutil.rmtree(partial, ignore_errors=True)
            make(partial)
            partial.rename(folder)
    return folder


@pytest.fixture(scope="session")
def good_images_dir(shared_dir: Path) -> Path:
    def write(folder: Path) -> None:
        write_good_folder(folder / "train" / "good", 24)

    return made_once(shared_dir / "good", write) / "train" / "good"


@pytest.fixture(scope="session")
def tiny_model_dir(shared_dir: Path, good_images_dir: Path) -> Path:
    """A MODEL_DIR holding one trained product, `widget`.

    Every test that needs it fails if training it fails: with one short line each (pytest
    repeats a session fixture's error for each of them), the full traceback once, here.
    """

    def trained(model_dir: Path) -> None:
        train(
            tiny_config(), good_images_dir.parent.parent, model_dir / TINY_PRODUCT, progress=False
        )

    try:
        return made_once(shared_dir / "models", trained)
    except Exception as error:
        traceback.print_exc()
        pytest.fail(f"training the tiny test model failed: {error!r:.300}", pytrace=False)
