"""Train a tiny model for real, then inspect: defects score higher and the heatmap finds them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from model.checkpoint import WEIGHTS
from model.data import load_rgb, to_tensor
from model.inspector import Inspector
from model.train import train
from tests.conftest import TINY_PRODUCT, tiny_config
from tests.images import part_image, with_defect

BOX = (20, 20, 34, 34)


def _assert_finds_the_defect(inspector: Inspector) -> None:
    clean = inspector.inspect([part_image(100 + i) for i in range(4)])
    damaged = inspector.inspect([with_defect(part_image(200 + i), BOX) for i in range(4)])
    assert min(r.raw_score for r in damaged) > max(r.raw_score for r in clean)
    assert not any(r.is_anomalous for r in clean), [r.score for r in clean]
    assert all(r.is_anomalous and r.score > 0.5 for r in damaged)
    for result in damaged:
        y, x = np.unravel_index(int(result.anomaly_map.argmax()), result.anomaly_map.shape)
        assert BOX[0] - 2 <= x <= BOX[2] + 2 and BOX[1] - 2 <= y <= BOX[3] + 2, (x, y)
        assert result.heatmap.min() >= 0.0 and result.heatmap.max() <= 1.0
        assert result.denoise_step >= 0


def test_a_pasted_defect_scores_higher_and_the_heatmap_peaks_on_it(tiny_model_dir: Path) -> None:
    inspector = Inspector.load(tiny_model_dir / TINY_PRODUCT)
    assert inspector.config.diffusion.space == "features"
    _assert_finds_the_defect(inspector)


def test_patch_space_finds_the_defect_too(good_images_dir: Path, tmp_path: Path) -> None:
    # Pixels folded 2x2 into channels: the image-space alternative to feature space.
    patch = {"space": "patch", "patch_size": 2, "block_out_channels": (16, 32)}
    config = tiny_config().with_overrides(diffusion={**patch, "norm_num_groups": 8})
    train(config, good_images_dir.parent.parent, tmp_path / "patch", progress=False)
    inspector = Inspector.load(tmp_path / "patch")
    _assert_finds_the_defect(inspector)
    picture = inspector.inspect([part_image(3)], return_reconstruction=True)[0].reconstruction
    assert picture is not None and picture.shape == (64, 64, 3) and picture.dtype == np.uint8


def test_results_do_not_depend_on_the_batch(tiny_model_dir: Path) -> None:
    inspector = Inspector.load(tiny_model_dir / TINY_PRODUCT)
    images = [part_image(5), with_defect(part_image(6), BOX), part_image(7)]
    together = inspector.inspect(images, return_reconstruction=True)
    alone = inspector.inspect(images[1:2])[0]
    assert abs(together[1].raw_score - alone.raw_score) < 1e-4
    assert together[1].denoise_step == alone.denoise_step
    # Feature space has no image to give back.
    assert together[0].reconstruction is None


def test_calibration_counts_only_held_out_images_none_of_them_trained_on(
    tiny_model_dir: Path, good_images_dir: Path
) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    training = json.loads((folder / "training.json").read_text())
    trained, held = set(training["train_files"]), set(training["holdout_files"])
    assert not trained & held
    assert trained | held == {p.name for p in good_images_dir.iterdir()}
    inspector = Inspector.load(folder)
    every = inspector.config.training.holdout_every
    assert inspector.calibration is not None
    assert inspector.calibration.num_images == len(held) == len(trained | held) // every


def test_the_map_is_the_memory_plus_the_reconstructions_excess_by_the_products_constants(
    tiny_model_dir: Path,
) -> None:
    inspector = Inspector.load(tiny_model_dir / TINY_PRODUCT)
    calibration = inspector.calibration
    assert calibration is not None and calibration.maps is not None
    assert set(calibration.maps) == {"reconstruction", "memory"}
    pipeline = inspector.pipeline
    images = to_tensor([part_image(8), with_defect(part_image(9), BOX)], 64)
    rec = pipeline.reconstruct(images)
    parts = pipeline.component_maps(images, rec)
    rescaled = {}
    for name, scale in calibration.maps.items():
        reference = pipeline.scales[name].reference if scale.reference else 0.0
        rescaled[name] = (parts[name] - reference - scale.low) / (scale.high - scale.low)
    expected = rescaled["memory"] + (rescaled["reconstruction"] - 1).clamp(min=0)
    torch.testing.assert_close(pipeline(images).maps, expected)
    # The held-out normals decided the references; each one taken is a real map.
    for name, scale in calibration.maps.items():
        taken = float(pipeline.scales[name].reference.abs().max())
        assert (taken > 0) == scale.reference, name


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / WEIGHTS))


def test_training_is_deterministic_for_a_seed_and_resumes_exactly(
    good_images_dir: Path, tmp_path: Path
) -> None:
    data = good_images_dir.parent.parent
    config = tiny_config(steps=6).with_overrides(training={"checkpoint_every": 3})
    train(config, data, tmp_path / "a", progress=False)
    train(config, data, tmp_path / "b", progress=False)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Stop after 3 steps, then resume to 6: the same weights as the unbroken run.
    half = config.with_overrides(training={"steps": 3})
    train(half, data, tmp_path / "c", progress=False, keep_resume=True)
    resumed = train(config, data, tmp_path / "c", resume=True, progress=False)
    assert resumed.steps == 6
    c = _weights(tmp_path / "c")
    assert all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)

    other = train(config.with_overrides(training={"seed": 1}), data, tmp_path / "d", progress=False)
    d = _weights(other.folder)
    assert not all(torch.equal(a[k], d[k]) for k in a)


def test_the_calibrated_delta_lets_no_held_out_normal_decide(
    tiny_model_dir: Path, good_images_dir: Path
) -> None:
    folder = tiny_model_dir / TINY_PRODUCT
    inspector = Inspector.load(folder)
    calibration = inspector.calibration
    assert calibration is not None and calibration.ads_delta is not None
    assert inspector.pipeline.ads.delta == calibration.ads_delta > 0
    held = json.loads((folder / "training.json").read_text())["holdout_files"]
    results = inspector.inspect([load_rgb(good_images_dir / name) for name in held])
    assert [r.denoise_step for r in results] == [0] * len(held)
    # And the delta is not so high that nothing ever decides: painted defects do.
    damaged = inspector.inspect([with_defect(part_image(700 + i), BOX) for i in range(4)])
    assert all(r.denoise_step > 0 for r in damaged), [r.denoise_step for r in damaged]
