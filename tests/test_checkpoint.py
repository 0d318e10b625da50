"""Model folders: a round trip, and each kind of bad folder failing with a clear message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.checkpoint import (
    CALIBRATION,
    CONFIG,
    MEMORY,
    REFERENCE_MAP,
    TRAINING,
    WEIGHTS,
    CheckpointError,
    sha256,
)
from model.data import to_tensor
from model.inspector import Inspector
from service.cli import main
from tests.conftest import TINY_PRODUCT
from tests.images import part_image, with_defect


@pytest.fixture
def folder(tiny_model_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_model_dir / TINY_PRODUCT, tmp_path / "copy"))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _vouch(folder: Path) -> None:
    """Record config.json's and calibration.json's hashes, as if training had written them."""
    _edit_json(
        folder / TRAINING,
        config_sha256=sha256(folder / CONFIG),
        calibration_sha256=sha256(folder / CALIBRATION),
    )


def test_round_trip_gives_the_same_results_and_holds_no_pickle(folder: Path) -> None:
    a = Inspector.load(folder).inspect([part_image(7)])[0]
    b = Inspector.load(folder).inspect([part_image(7)])[0]
    assert a.raw_score == b.raw_score and a.denoise_step == b.denoise_step
    for path in folder.rglob("*"):
        assert path.suffix in {".json", ".safetensors", ""}, path


def _expect(folder: Path, *fragments: str) -> None:
    with pytest.raises(CheckpointError) as caught:
        Inspector.load(folder)
    for fragment in fragments:
        assert fragment in str(caught.value)


def test_missing_folder(tmp_path: Path) -> None:
    _expect(tmp_path / "nope", "no model folder")


@pytest.mark.parametrize("name", [WEIGHTS, CONFIG, CALIBRATION, REFERENCE_MAP, TRAINING])
def test_partial_folder_names_the_missing_file(folder: Path, name: str) -> None:
    (folder / name).unlink()
    _expect(folder, name, "missing")


def test_truncated_weights_do_not_match_their_hash(folder: Path) -> None:
    data = (folder / WEIGHTS).read_bytes()
    (folder / WEIGHTS).write_bytes(data[: len(data) // 2])
    _expect(folder, WEIGHTS, "hash")


def test_corrupt_weights_with_a_matching_hash(folder: Path) -> None:
    (folder / WEIGHTS).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    _edit_json(folder / TRAINING, weights_sha256=sha256(folder / WEIGHTS))
    _expect(folder, WEIGHTS, "corrupt")


def test_invalid_json(folder: Path) -> None:
    (folder / CALIBRATION).write_text("{not json")
    _vouch(folder)
    _expect(folder, CALIBRATION, "not valid JSON")


@pytest.mark.parametrize("name", [CONFIG, CALIBRATION])
def test_an_edited_config_or_calibration_is_refused(folder: Path, name: str) -> None:
    change = {"threshold": 1e9} if name == CALIBRATION else {"image_size": 96}
    _edit_json(folder / name, **change)
    _expect(folder, name, "changed after training", "glad calibrate")


def test_other_format_version(folder: Path) -> None:
    _edit_json(folder / CONFIG, format_version=99)
    _expect(folder, "format version 99")


def test_a_config_written_before_the_ads_fields_moved_reads_as_it_was_meant(
    folder: Path,
) -> None:
    config = json.loads((folder / CONFIG).read_text())
    margin = config["training"].pop("delta_margin")
    earlier = {"delta_margin": 1.3, "check_reference": "x0_in", "checks_after_snap": True}
    _edit_json(folder / CONFIG, ads={**config["ads"], **earlier}, training=config["training"])
    _vouch(folder)
    assert margin == 1.1
    assert Inspector.load(folder).config.training.delta_margin == 1.3
    # An option whose other value is gone is refused, not silently changed.
    _edit_json(folder / CONFIG, ads={**config["ads"], "check_reference": "input"})
    _vouch(folder)
    _expect(folder, "invalid config", "ads.check_reference is no longer supported")


def test_invalid_config_value(folder: Path) -> None:
    _edit_json(folder / CONFIG, image_size=-3)
    _vouch(folder)
    _expect(folder, "invalid config", "image_size")


def test_weights_of_another_architecture(folder: Path) -> None:
    config = json.loads((folder / CONFIG).read_text())
    config["diffusion"]["block_out_channels"] = [64, 128]
    (folder / CONFIG).write_text(json.dumps(config))
    _vouch(folder)
    _expect(folder, "weights do not match", "wrong shape")


def test_reference_map_of_the_wrong_size(folder: Path) -> None:
    calibration = json.loads((folder / CALIBRATION).read_text())
    for scale in calibration["maps"].values():
        scale["reference"] = True
    _edit_json(folder / CALIBRATION, maps=calibration["maps"])
    _vouch(folder)
    shapes = {"reconstruction": (64, 64), "memory": (3, 3)}
    save_file({k: torch.zeros(v) for k, v in shapes.items()}, str(folder / REFERENCE_MAP))
    _edit_json(folder / TRAINING, reference_map_sha256=sha256(folder / REFERENCE_MAP))
    _expect(folder, REFERENCE_MAP, "(64, 64)", "'memory'")


def test_a_memory_of_the_wrong_width_or_missing(folder: Path) -> None:
    patches = load_file(str(folder / MEMORY))["patches"]
    assert patches.ndim == 2 and patches.shape[1] == 24 + 32  # the demo's layers 3 and 6
    save_file({"patches": patches[:, :5].contiguous()}, str(folder / MEMORY))
    _edit_json(folder / TRAINING, memory_sha256=sha256(folder / MEMORY))
    _expect(folder, MEMORY, "(M, 56)")
    (folder / MEMORY).unlink()
    _expect(folder, "missing", MEMORY)


def test_a_changed_memory_is_refused(folder: Path) -> None:
    patches = load_file(str(folder / MEMORY))["patches"]
    save_file({"patches": patches + 1}, str(folder / MEMORY))
    _expect(folder, MEMORY, "does not match its hash")


def _as_before_the_memory(folder: Path) -> torch.Tensor:
    """Turn a folder into one trained before the memory of normal patches: no memory, a config
    without its fields, one reference map. Returns that reference map."""
    config = json.loads((folder / CONFIG).read_text())
    del config["memory"], config["scoring"]["maps"], config["scoring"]["fusion"]
    (folder / CONFIG).write_text(json.dumps(config))
    calibration = json.loads((folder / CALIBRATION).read_text())
    del calibration["maps"]
    (folder / CALIBRATION).write_text(json.dumps(calibration))
    reference = torch.linspace(0, 1, 64 * 64).view(64, 64)
    save_file({"reference_map": reference}, str(folder / REFERENCE_MAP))
    (folder / MEMORY).unlink()
    training = json.loads((folder / TRAINING).read_text())
    for key in ("memory_sha256", "memory_patches", "memory_training_patches", "memory_mib"):
        del training[key]
    (folder / TRAINING).write_text(json.dumps(training))
    _edit_json(folder / TRAINING, reference_map_sha256=sha256(folder / REFERENCE_MAP))
    _vouch(folder)
    return reference


def test_a_folder_from_before_the_memory_is_served_as_before_and_glad_calibrate_adds_it(
    folder: Path, good_images_dir: Path
) -> None:
    reference = _as_before_the_memory(folder)
    old = Inspector.load(folder)
    assert old.pipeline.memory is None and old.config.scoring.maps == ("reconstruction",)
    images = to_tensor([part_image(7), with_defect(part_image(8))], 64)
    parts = old.pipeline.component_maps(images, old.pipeline.reconstruct(images))
    assert parts.keys() == {"reconstruction"}
    # The reconstruction's map less the reference map: exactly what it was served.
    assert torch.equal(old.pipeline(images).maps, parts["reconstruction"] - reference)

    data = good_images_dir.parent.parent
    assert main(["calibrate", "--model", str(folder), "--data", str(data)]) == 0
    new = Inspector.load(folder)
    assert new.pipeline.memory is not None and new.config.memory is not None
    assert new.config.scoring.maps == ("reconstruction", "memory")
    assert new.calibration is not None and new.calibration.maps is not None
    assert set(new.calibration.maps) == {"reconstruction", "memory"}
    training = json.loads((folder / TRAINING).read_text())
    # Built from the images it was trained on: 64 px, layer 3's 16 x 16 grid each.
    assert training["memory_training_patches"] == len(training["train_files"]) * 16 * 16
    assert training["memory_patches"] == len(new.pipeline.memory)
    clean, damaged = new.inspect([part_image(7), with_defect(part_image(8))])
    assert damaged.raw_score > clean.raw_score and damaged.is_anomalous


def test_feature_space_without_its_statistics(folder: Path) -> None:
    weights = load_file(str(folder / WEIGHTS))
    assert weights["space.mean"].shape == weights["space.std"].shape == (56,)
    del weights["space.std"]
    save_file(weights, str(folder / WEIGHTS))
    _edit_json(folder / TRAINING, weights_sha256=sha256(folder / WEIGHTS))
    _expect(folder, "space.std", "(56,)")


def test_glad_calibrate_recalibrates_on_the_held_out_images_and_nothing_else(
    folder: Path, good_images_dir: Path, tmp_path: Path
) -> None:
    original = json.loads((folder / CALIBRATION).read_text())
    _edit_json(folder / CALIBRATION, threshold=1e9)
    data = good_images_dir.parent.parent
    assert main(["calibrate", "--model", str(folder), "--data", str(data)]) == 0
    loaded = Inspector.load(folder)
    assert loaded.calibration is not None
    assert loaded.calibration.threshold == pytest.approx(original["threshold"], rel=1e-4)
    # Another folder of images holds other held-out files: refused, nothing written.
    other = tmp_path / "other"
    shutil.copytree(good_images_dir, other)
    (other / sorted(p.name for p in other.iterdir())[7]).unlink()
    before = (folder / CALIBRATION).read_bytes()
    assert main(["calibrate", "--model", str(folder), "--data", str(other)]) == 2
    assert (folder / CALIBRATION).read_bytes() == before
