"""Shared fixtures: a tiny GLAD model, really trained once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from model.config import GladConfig
from model.train import train
from tests.images import write_good_folder

TINY_PRODUCT = "widget"


def tiny_config(steps: int = 300) -> GladConfig:
    """A model small enough to train on this CPU in about 20 s, yet find a painted defect."""
    return GladConfig(image_size=64).with_overrides(
        diffusion={
            "patch_size": 2,
            "block_out_channels": (16, 32),
            "attention_levels": (False, True),
            "layers_per_block": 1,
            "norm_num_groups": 8,
        },
        training={
            "steps": steps,
            "batch_size": 8,
            "warmup_steps": 20,
            "learning_rate": 1e-3,
            "checkpoint_every": steps,
        },
        ads={"num_steps": 5, "start_step": 250, "t_min": 150},
        features={"ads_layer": 6, "score_layers": (3, 6)},
    )


@pytest.fixture(scope="session")
def good_images_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_folder(tmp_path_factory.mktemp("good") / "train" / "good", 24)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, good_images_dir: Path) -> Path:
    """A MODEL_DIR holding one trained product, `widget`."""
    model_dir = tmp_path_factory.mktemp("models")
    train(tiny_config(), good_images_dir.parent.parent, model_dir / TINY_PRODUCT, progress=False)
    return model_dir
