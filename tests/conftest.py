"""Shared fixtures: a tiny GLAD model, really trained once per test session."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

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


@pytest.fixture(scope="session")
def good_images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_folder(tmp_path_factory.mktemp("good") / "train" / "good", 24)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, good_images_dir: Path) -> Path:
    """A MODEL_DIR holding one trained product, `widget`.

    Every test that needs it fails if training it fails: with one short line each (pytest
    repeats a session fixture's error for each of them), the full traceback once, here.
    """
    model_dir = tmp_path_factory.mktemp("models")
    try:
        train(
            tiny_config(), good_images_dir.parent.parent, model_dir / TINY_PRODUCT, progress=False
        )
    except Exception as error:
        traceback.print_exc()
        pytest.fail(f"training the tiny test model failed: {error!r:.300}", pytrace=False)
    return model_dir
