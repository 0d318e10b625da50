"""`glad import`: the authors' checkpoints as a served product line (the paper preset)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from model.calibrate import recalibrate_folder
from model.checkpoint import CheckpointError
from model.config import AUTHORS_PROMPT, PRESETS
from model.demo import write_good_folder
from model.importer import import_checkpoints, unet_files
from model.inspector import Inspector
from model.sd import encode_prompt
from service.app import create_app
from service.cli import main
from service.settings import Settings
from tests.authors_layout import IMAGE_SIZE, AuthorsFiles, write_authors_files
from tests.images import part_image, with_defect
from tests.service_harness import png, serving

GLAD = [sys.executable, "-m", "service.cli"]
PRODUCT = "widget"
NUM_GOOD = 4


def _glad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GLAD, *args], capture_output=True, text=True, timeout=300)


def _import(authors: AuthorsFiles, data: Path, out: Path, *extra: str) -> None:
    done = _glad(
        "import",
        *("--sd", str(authors.sd), "--unet", str(authors.checkpoint)),
        *("--dino", str(authors.dino), "--data", str(data), "--out", str(out)),
        *("--image-size", str(IMAGE_SIZE), "--device", "cpu", *extra),
    )
    assert done.returncode == 0, done.stderr
    assert "threshold" in done.stdout and f"from {NUM_GOOD} good images" in done.stdout


def _own_copy(authors: AuthorsFiles, root: Path) -> AuthorsFiles:
    """The authors' files copied under root, to change or remove."""
    top = authors.checkpoint.parents[2]
    shutil.copytree(top, root)
    return AuthorsFiles(
        root / authors.sd.name,
        root / authors.checkpoint.relative_to(top),
        root / authors.dino.name,
    )


# For the tests of files, not of the sampler: 5 steps rather than the preset's 25.
FEW_STEPS = PRESETS["paper"].with_overrides(ads={"num_steps": 5})


def _import_here(authors: AuthorsFiles, data: Path, out: Path, copy: bool = False) -> None:
    import_checkpoints(
        authors.sd,
        authors.checkpoint,
        authors.dino,
        data,
        out,
        base=FEW_STEPS,
        image_size=IMAGE_SIZE,
        copy=copy,
    )


@pytest.fixture(scope="module")
def authors(tmp_path_factory: pytest.TempPathFactory) -> AuthorsFiles:
    return write_authors_files(tmp_path_factory.mktemp("authors"))


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_good_folder(
        tmp_path_factory.mktemp("good") / "train" / "good", NUM_GOOD, IMAGE_SIZE
    )


@pytest.fixture(scope="module")
def imported(authors: AuthorsFiles, good: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("models") / PRODUCT
    _import(authors, good, out)
    return out


def test_import_records_each_file_with_its_hash_and_serves_the_fine_tuned_unet(
    authors: AuthorsFiles, imported: Path
) -> None:
    config = json.loads((imported / "config.json").read_text())
    assert config["preset"] == "paper" and config["image_size"] == IMAGE_SIZE
    sources = config["sources"]
    assert sources["unet_weights"]["path"] == str(authors.checkpoint / "model.safetensors")
    assert sources["unet_config"]["path"] == str(authors.sd / "unet" / "config.json")
    assert sources["dino_weights"]["path"] == str(authors.dino)
    assert all(len(source["sha256"]) == 64 for source in sources.values())
    training = json.loads((imported / "training.json").read_text())
    assert training["imported"] and training["num_holdout_images"] == NUM_GOOD

    inspector = Inspector.load(imported)
    assert (inspector.config.ads.start_step, inspector.config.ads.num_steps) == (750, 25)
    assert (
        inspector.calibration.ads_delta is not None and inspector.calibration.num_images == NUM_GOOD
    )
    # The authors' fine-tuned weights are served, not SD's own UNet.
    served = inspector.pipeline.denoiser.unet.state_dict()
    for key, value in load_file(str(authors.checkpoint / "model.safetensors")).items():
        torch.testing.assert_close(served[key], value)
    sd_unet = load_file(str(authors.sd / "unet" / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(served["conv_in.weight"], sd_unet["conv_in.weight"])
    # The prompt was encoded at import: serving needs no text encoder.
    cond, uncond = encode_prompt(authors.sd, AUTHORS_PROMPT)
    torch.testing.assert_close(inspector.pipeline.denoiser.embeddings, torch.cat([uncond, cond]))
    assert not torch.allclose(cond, uncond)


def test_an_imported_model_answers_inspect_through_the_api(imported: Path) -> None:
    settings = Settings(model_dir=imported.parent, max_wait_ms=0)
    with serving(create_app(settings)) as url:
        clean = httpx.post(
            f"{url}/inspect/{PRODUCT}",
            files={"file": ("part.png", png(part_image(100, IMAGE_SIZE)), "image/png")},
            timeout=120,
        )
        damaged = httpx.post(
            f"{url}/inspect/{PRODUCT}",
            files={
                "file": ("part.png", png(with_defect(part_image(101, IMAGE_SIZE))), "image/png")
            },
            timeout=120,
        )
        products = httpx.get(f"{url}/products", timeout=10).json()
    assert clean.status_code == 200, clean.text
    assert damaged.status_code == 200, damaged.text
    for answer in (clean.json(), damaged.json()):
        assert 0.0 <= answer["score"] <= 1.0 and answer["denoise_step"] >= 0
        assert answer["model_image_size"] == IMAGE_SIZE and answer["heatmap"] is not None
        assert answer["model_version"] == Inspector.load(imported).version
    assert [(p["name"], p["preset"]) for p in products["products"]] == [(PRODUCT, "paper")]


def test_a_weights_file_changed_after_import_is_refused(
    authors: AuthorsFiles, good: Path, tmp_path: Path
) -> None:
    own = _own_copy(authors, tmp_path / "authors")
    out = tmp_path / "models" / PRODUCT
    _import_here(own, good, out)
    Inspector.load(out)

    weights = own.checkpoint / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(CheckpointError, match="unet_weights file .* changed after `glad import`"):
        Inspector.load(out)
    weights.write_bytes(original)
    own.dino.unlink()
    with pytest.raises(CheckpointError, match="dino_weights file .* is missing"):
        Inspector.load(out)


def test_copied_weights_make_the_folder_self_contained(
    authors: AuthorsFiles, good: Path, tmp_path: Path
) -> None:
    own = _own_copy(authors, tmp_path / "authors")
    out = tmp_path / "models" / PRODUCT
    _import_here(own, good, out, copy=True)
    shutil.rmtree(tmp_path / "authors")
    config = json.loads((out / "config.json").read_text())
    assert config["sources"]["unet_weights"]["path"] == "sources/unet/model.safetensors"
    assert Inspector.load(out).calibration is not None

    copied = out / "sources" / "dino" / "dino_vitbase8_pretrain.pth"
    copied.write_bytes(copied.read_bytes() + b"\0")
    with pytest.raises(CheckpointError, match="dino_weights file .* changed"):
        Inspector.load(out)


def test_recalibrating_an_imported_model_uses_all_its_good_images(
    authors: AuthorsFiles, good: Path, tmp_path: Path
) -> None:
    out = tmp_path / PRODUCT
    _import_here(authors, good, out)
    first = Inspector.load(out).calibration
    calibration = recalibrate_folder(out, good)
    assert calibration.num_images == NUM_GOOD
    assert calibration == first


def test_the_unet_can_be_given_in_each_form_the_authors_leave(
    authors: AuthorsFiles, tmp_path: Path
) -> None:
    sd_config = authors.sd / "unet" / "config.json"
    weights = authors.checkpoint / "model.safetensors"
    assert unet_files(authors.checkpoint, authors.sd) == (sd_config, weights)
    assert unet_files(weights, authors.sd) == (sd_config, weights)
    older = tmp_path / "checkpoint-2500"
    older.mkdir()
    torch.save(load_file(str(weights)), older / "pytorch_model.bin")
    assert unet_files(older, authors.sd) == (sd_config, older / "pytorch_model.bin")
    unet_folder = authors.sd / "unet"
    assert unet_files(unet_folder, authors.sd)[1].name == "diffusion_pytorch_model.safetensors"
    assert unet_files(None, authors.sd) == unet_files(unet_folder, authors.sd)
    with pytest.raises(ValueError, match="not a weights file"):
        unet_files(tmp_path / "empty", authors.sd)


def test_import_refuses_what_it_cannot_serve(
    authors: AuthorsFiles, good: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    compact = tmp_path / "compact.json"
    compact.write_text(PRESETS["compact"].model_dump_json())
    cases = {
        ("--config", str(compact)): "the config's space must be vae",
        ("--dino", str(tmp_path / "nowhere.pth")): "no such file",
        ("--sd", str(tmp_path)): "vae/config.json is missing",
        ("--unet", str(tmp_path)): "not a weights file",
    }
    for (option, value), message in cases.items():
        args = {"--sd": str(authors.sd), "--dino": str(authors.dino), "--data": str(good)}
        args |= {"--out": str(tmp_path / "out"), option: value}
        flat = [part for pair in args.items() for part in pair]
        assert main(["import", *flat, "--image-size", str(IMAGE_SIZE), "--device", "cpu"]) == 2
        error = capsys.readouterr().err
        assert error.startswith("glad import: error:") and message in error, error
    assert not (tmp_path / "out").exists()
