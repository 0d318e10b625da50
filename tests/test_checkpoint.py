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
    REFERENCE_MAP,
    TRAINING,
    WEIGHTS,
    CheckpointError,
    sha256,
)
from model.inspector import Inspector
from service.cli import main
from tests.conftest import TINY_PRODUCT
from tests.images import part_image


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
    save_file({"reference_map": torch.zeros(3, 3)}, str(folder / REFERENCE_MAP))
    _edit_json(folder / TRAINING, reference_map_sha256=sha256(folder / REFERENCE_MAP))
    _expect(folder, REFERENCE_MAP, "(64, 64)")


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
