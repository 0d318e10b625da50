"""`glad train`, `glad eval` and `glad predict` as a user runs them."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from service.cli import main
from tests.conftest import TINY_PRODUCT, tiny_config
from tests.images import part_image, with_defect, write_mvtec_category

GLAD = [sys.executable, "-m", "service.cli"]


def _glad(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GLAD, *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def category(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_mvtec_category(tmp_path_factory.mktemp("data") / "widget")


@pytest.mark.parametrize("command", ["train", "eval", "predict", "demo", "serve", "worker"])
def test_every_command_has_help(command: str) -> None:
    done = _glad(command, "--help")
    assert done.returncode == 0 and "usage: glad" in done.stdout


def test_train_writes_a_loadable_folder(
    category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(tiny_config().model_dump_json())
    out = tmp_path / "models" / "widget"
    done = _glad(
        "train",
        "--config",
        str(config),
        "--data",
        str(category),
        "--out",
        str(out),
        "--steps",
        "4",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert "trained 4 steps" in done.stdout
    assert "4 steps end inside the 20-step learning-rate warm-up" in done.stderr
    assert json.loads((out / "training.json").read_text())["num_train_images"] == 18  # 24 - 6
    # Nothing but the model is left in the folder that gets deployed.
    assert not (out / "resume").exists()

    # The rest in this process: the messages are the command's, and a subprocess costs
    # seconds here.
    again = ["train", "--config", str(config), "--data", str(category), "--out", str(out)]
    assert main(again) == 2
    error = capsys.readouterr().err
    assert "already exists" in error and "--force" in error
    assert main([*again, "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main([*again, "--force", "--steps", "2", "--device", "cpu"]) == 0
    assert json.loads((out / "training.json").read_text())["steps"] == 2


def test_extra_good_images_are_trained_on_and_never_held_out(
    category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "tiny.json"
    config.write_text(tiny_config().model_dump_json())
    extra = tmp_path / "false-alarms"
    extra.mkdir()
    for seed in range(3):
        part_image(100 + seed).save(extra / f"fa-{seed}.png")
    out = tmp_path / "widget"
    train = ["train", "--config", str(config), "--data", str(category), "--out", str(out)]
    assert main([*train, "--steps", "2", "--device", "cpu", "--extra-good", str(extra)]) == 0
    training = json.loads((out / "training.json").read_text())
    assert training["num_train_images"] == 18 + 3 and training["num_extra_good_images"] == 3
    assert not {"fa-0.png", "fa-1.png", "fa-2.png"} & set(training["holdout_files"])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([*train, "--force", "--steps", "2", "--extra-good", str(empty)]) == 2
    assert "--extra-good" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value", "words"),
    [
        (
            "--image-size",
            "50",
            "image_size 50 must be a multiple of 16 (pixels per sample position x 2^(UNet "
            "levels - 1))",
        ),
        ("--steps", "0", "training.steps: Input should be greater than or equal to 1 (got 0)"),
    ],
)
def test_a_bad_setting_is_one_plain_sentence(
    category: Path,
    tmp_path: Path,
    flag: str,
    value: str,
    words: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # In this process: the message is the command's, and a subprocess costs seconds here.
    assert main(["train", "--data", str(category), "--out", str(tmp_path / "m"), flag, value]) == 2
    assert capsys.readouterr().err == f"glad train: error: invalid setting: {words}\n"


def test_version_and_defaults_in_help() -> None:
    assert _glad("--version").stdout.startswith("glad 0.1.0")
    assert "(default: 0)" in _glad("train", "--help").stdout


def test_eval_reports_every_metric_and_a_montage(
    tiny_model_dir: Path, category: Path, tmp_path: Path
) -> None:
    report = tmp_path / "not-yet" / "report.json"  # its folder is created
    done = _glad(
        "eval",
        "--model",
        str(tiny_model_dir / TINY_PRODUCT),
        "--data",
        str(category),
        "--report",
        str(report),
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(report.read_text())
    for key in (
        "image_auroc",
        "image_ap",
        "image_f1",
        "pixel_auroc",
        "pixel_ap",
        "pixel_f1",
        "aupro",
        "mean_denoise_step",
        "ms_per_image",
    ):
        assert key in metrics and key in done.stdout
    # The painted blotches are easy: the tiny model must separate them.
    assert metrics["image_auroc"] == 1.0
    assert metrics["pixel_auroc"] > 0.9
    with Image.open(report.with_suffix(".png")) as montage:
        # input, its features, the reconstructed features, heatmap, ground truth; 8 rows of
        # 192 px tiles under a 16 px caption, and the titles' band on top
        assert montage.size == (5 * 192, 16 + 8 * (192 + 16))
    assert metrics["per_defect"]["blotch"] == {
        "count": 4,
        "judged_right": 1.0,
        "mean_score": pytest.approx(1.0, abs=0.2),
        "image_auroc": 1.0,
    }
    assert "blotch" in done.stdout and "judged right" in done.stdout
    with report.with_suffix(".csv").open() as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 8 and {r["defect"] for r in rows} == {"good", "blotch"}
    assert all((r["is_anomalous"] == "True") == (r["defect"] == "blotch") for r in rows)
    with Image.open(tmp_path / "not-yet" / "report_curves.png") as curves:
        assert curves.size[0] > 3 * curves.size[1] // 2
    assert "near chance" not in done.stderr


def test_predict_prints_a_verdict_and_writes_the_heatmap(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    image = tmp_path / "part.png"
    with_defect(part_image(900), (20, 20, 34, 34)).save(image)
    heatmap = tmp_path / "heat.png"
    done = _glad(
        "predict",
        "--model",
        str(tiny_model_dir / TINY_PRODUCT),
        str(image),
        "-o",
        str(heatmap),
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert "ANOMALOUS" in done.stdout and "denoise step" in done.stdout
    with Image.open(heatmap) as picture:
        assert picture.size == (64, 64)


def test_bad_input_is_one_clear_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["predict", "--model", str(tmp_path / "missing"), str(tmp_path / "x.png")]) == 2
    error = capsys.readouterr().err
    assert "no model folder" in error and "Traceback" not in error


def test_demo_trains_a_product_and_writes_sample_images(tmp_path: Path) -> None:
    out, images = tmp_path / "models" / "demo", tmp_path / "images"
    done = _glad("demo", "--out", str(out), "--images", str(images), "--steps", "4", "--quiet")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").is_file()
    assert {p.name for p in images.iterdir()} == {"good.png", "defect.png"}
