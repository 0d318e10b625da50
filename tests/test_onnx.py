"""`glad export` and the ONNX Runtime backend: parity with torch, per-product selection."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch

from model.checkpoint import CheckpointError, rewrite_config
from model.config import GladConfig
from model.inspector import Inspector
from model.ort import UNET, WEIGHTS_KEY, OrtDenoiser, OrtFeatures, onnx_file
from service.cli import main
from tests.conftest import TINY_PRODUCT


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.float() - want.float()).norm() / want.float().norm())


@pytest.fixture(scope="module")
def exported(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the tiny product, exported by the command a user runs."""
    folder = tmp_path_factory.mktemp("onnx") / TINY_PRODUCT
    shutil.copytree(tiny_model_dir / TINY_PRODUCT, folder)
    assert main(["export", "--model", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def both(exported: Path) -> tuple[Inspector, Inspector]:
    return Inspector.load(exported, backend="torch"), Inspector.load(exported)


def test_export_writes_the_files_and_switches_the_product(exported: Path) -> None:
    for name in ("unet.onnx", "features.onnx", "unet.fp16.onnx", "features.fp16.onnx"):
        assert (exported / name).is_file()
    assert json.loads((exported / "config.json").read_text())["runtime"]["backend"] == "onnxruntime"


@pytest.mark.parametrize("batch", [1, 3])
def test_exported_parts_match_torch_with_a_dynamic_batch(
    both: tuple[Inspector, Inspector], batch: int
) -> None:
    torch_model, ort_model = both
    g = torch.Generator().manual_seed(batch)
    size = torch_model.config.image_size
    grid = size // torch_model.pipeline.space.fold
    z = torch.randn(batch, torch_model.pipeline.space.channels, grid, grid, generator=g)
    t = torch.randint(1, 300, (batch,), generator=g)
    assert (
        _relative_error(ort_model.pipeline.denoiser(z, t), torch_model.pipeline.denoiser(z, t))
        < 1e-3
    )
    images = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    want, got = torch_model.pipeline.features(images), ort_model.pipeline.features(images)
    assert sorted(got) == sorted(want) == [3, 6]
    for layer in want:
        assert got[layer].shape == want[layer].shape
        assert _relative_error(got[layer], want[layer]) < 1e-3


def test_fp16_files_match_torch_fp32_within_1e_2(exported: Path) -> None:
    # Run here on the CPU provider; on a GPU the same files run on the CUDA provider.
    torch_model = Inspector.load(exported, backend="torch", dtype=torch.float32)
    half = Inspector.load(exported, dtype=torch.float16)
    g = torch.Generator().manual_seed(5)
    size = torch_model.config.image_size
    grid = size // torch_model.pipeline.space.fold
    z = torch.randn(2, torch_model.pipeline.space.channels, grid, grid, generator=g)
    t = torch.tensor([50, 250])
    assert (
        _relative_error(half.pipeline.denoiser(z.half(), t), torch_model.pipeline.denoiser(z, t))
        < 1e-2
    )
    images = torch.rand(2, 3, size, size, generator=g) * 2 - 1
    want, got = torch_model.pipeline.features(images), half.pipeline.features(images.half())
    for layer in want:
        assert got[layer].dtype == torch.float16
        assert _relative_error(got[layer], want[layer]) < 1e-2


def test_inspector_on_onnxruntime_scores_like_torch(both: tuple[Inspector, Inspector]) -> None:
    torch_model, ort_model = both
    assert isinstance(ort_model.pipeline.denoiser, OrtDenoiser)
    assert isinstance(ort_model.pipeline.features, OrtFeatures)
    options = ort_model.pipeline.denoiser.module.session.get_session_options()
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert options.intra_op_num_threads == os.cpu_count()
    size = torch_model.config.image_size
    images = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(7)) * 2 - 1
    want, got = torch_model.pipeline(images), ort_model.pipeline(images)
    assert got.reconstruction.denoise_steps.tolist() == want.reconstruction.denoise_steps.tolist()
    torch.testing.assert_close(got.scores, want.scores, rtol=1e-3, atol=1e-4)
    # The fused map, the memory's part in it included.
    assert ort_model.pipeline.memory is not None
    assert _relative_error(got.maps, want.maps) < 1e-3


def test_missing_or_stale_onnx_files_are_refused(exported: Path, tmp_path: Path) -> None:
    stale = tmp_path / "stale"
    shutil.copytree(exported, stale)
    onnx_file(stale, UNET, torch.float16).unlink()
    with pytest.raises(CheckpointError, match="glad export"):
        Inspector.load(stale, dtype=torch.float16)

    model = onnx.load(str(onnx_file(stale, UNET, torch.float32)))
    for prop in model.metadata_props:
        if prop.key == WEIGHTS_KEY:
            prop.value = "0" * 64
    onnx.save(model, str(onnx_file(stale, UNET, torch.float32)))
    with pytest.raises(CheckpointError, match="other weights"):
        Inspector.load(stale)

    config = json.loads((exported / "config.json").read_text())
    config["features"]["ads_layer"] = 3
    rewrite_config(stale, GladConfig.model_validate(config))
    shutil.copy(onnx_file(exported, UNET, torch.float32), onnx_file(stale, UNET, torch.float32))
    with pytest.raises(CheckpointError, match="other features"):
        Inspector.load(stale)
    # The torch backend is unaffected by the ONNX files.
    assert not isinstance(Inspector.load(stale, backend="torch").pipeline.denoiser, OrtDenoiser)
