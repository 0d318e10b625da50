"""Synthetic anomalies: Perlin masks, texture sources and the blend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from model.config import SynthesisConfig
from model.synthesis import (
    TextureSource,
    perlin_masks,
    perlin_noise,
    synthesize_anomalies,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(batch: int = 4, height: int = 32, width: int = 32, seed: int = 123) -> torch.Tensor:
    return torch.rand(batch, 3, height, width, generator=_gen(seed)) * 2 - 1


def _patches(image: torch.Tensor, grid: int) -> list[torch.Tensor]:
    channels, height, width = image.shape
    ph, pw = height // grid, width // grid
    blocks = image.reshape(channels, grid, ph, grid, pw).permute(1, 3, 0, 2, 4)
    return list(blocks.reshape(grid * grid, channels, ph, pw))


@pytest.mark.parametrize(("height", "width", "res_y", "res_x"), [(32, 32, 4, 4), (30, 45, 4, 7)])
def test_perlin_noise_shape_range_and_smoothness(
    height: int, width: int, res_y: int, res_x: int
) -> None:
    noise = perlin_noise(height, width, res_y, res_x, _gen())
    assert noise.shape == (height, width)
    assert noise.abs().max() <= 0.75
    assert noise.std() > 0.05
    # Continuous across cell boundaries: neighbouring pixels differ by far less than the range.
    assert noise.diff(dim=0).abs().max() < 0.5
    assert noise.diff(dim=1).abs().max() < 0.5


@pytest.mark.parametrize(("height", "width"), [(32, 32), (24, 40), (7, 9)])
@pytest.mark.parametrize("threshold", [0.3, 0.6, 5.0])
def test_masks_binary_and_never_empty(height: int, width: int, threshold: float) -> None:
    # 5.0 is above any Perlin value, so only the fallback can keep those masks non-empty.
    config = SynthesisConfig(perlin_threshold=threshold)
    masks = perlin_masks(12, height, width, config, _gen(3))
    assert masks.shape == (12, 1, height, width)
    assert masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert (masks.flatten(1).sum(dim=1) > 0).all()


def test_masks_vary_between_samples() -> None:
    masks = perlin_masks(6, 32, 32, SynthesisConfig(), _gen(1))
    assert len({tuple(m.flatten().tolist()) for m in masks}) == 6


def test_shapes_range_and_dtype() -> None:
    images = _images(batch=5, height=24, width=40)
    out, masks = synthesize_anomalies(images, SynthesisConfig(), _gen())
    assert out.shape == images.shape
    assert masks.shape == (5, 1, 24, 40)
    assert out.dtype == images.dtype and masks.dtype == images.dtype
    assert out.min() >= -1 and out.max() <= 1


def test_probability_zero_returns_inputs_unchanged() -> None:
    images = _images()
    out, masks = synthesize_anomalies(images, SynthesisConfig(anomaly_probability=0.0), _gen())
    assert torch.equal(out, images)
    assert not masks.any()
    assert out.data_ptr() != images.data_ptr()


def test_probability_one_changes_only_inside_the_mask() -> None:
    images = _images(batch=6)
    out, masks = synthesize_anomalies(images, SynthesisConfig(anomaly_probability=1.0), _gen())
    inside = masks.expand_as(images).bool()
    assert torch.equal(out[~inside], images[~inside])
    changed = (out != images).any(dim=1, keepdim=True)
    assert not (changed & ~masks.bool()).any()
    # Every sample got an anomaly, and it changed most of its masked pixels.
    for sample_changed, mask in zip(changed, masks, strict=True):
        assert mask.sum() > 0
        assert sample_changed[mask.bool()].float().mean() > 0.5


def test_mixed_probability_leaves_unmasked_samples_untouched() -> None:
    images = _images(batch=16)
    out, masks = synthesize_anomalies(images, SynthesisConfig(anomaly_probability=0.5), _gen(5))
    has_anomaly = masks.flatten(1).any(dim=1)
    assert 0 < has_anomaly.sum() < 16
    assert torch.equal(out[~has_anomaly], images[~has_anomaly])


def test_same_seed_same_output_other_seed_differs() -> None:
    images = _images()
    config = SynthesisConfig(anomaly_probability=1.0)
    first = synthesize_anomalies(images, config, _gen(7))
    again = synthesize_anomalies(images, config, _gen(7))
    other = synthesize_anomalies(images, config, _gen(8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])
    assert not torch.equal(first[0], other[0])


def test_beta_zero_pastes_the_folder_texture(tmp_path: Path) -> None:
    # One solid-colour texture: with beta 0, masked pixels must become exactly that colour.
    colour = (255, 0, 127)
    Image.new("RGB", (20, 12), colour).save(tmp_path / "red.PNG")
    (tmp_path / "notes.txt").write_text("not an image")
    source = TextureSource.from_folder(tmp_path, image_size=16)
    assert len(source) == 1
    images = _images(batch=3, height=24, width=24)
    config = SynthesisConfig(anomaly_probability=1.0, beta_max=0.0, texture_dir=str(tmp_path))
    out, masks = synthesize_anomalies(images, config, _gen(), textures=source)
    expected = torch.tensor(colour, dtype=torch.float32) / 127.5 - 1
    inside = masks[:, 0].bool()
    pixels = out.permute(0, 2, 3, 1)[inside]
    assert pixels.shape[0] > 0
    torch.testing.assert_close(pixels, expected.expand_as(pixels), atol=1e-5, rtol=0)


def test_folder_textures_are_all_used(tmp_path: Path) -> None:
    for value in (0, 128, 255):
        Image.new("RGB", (8, 8), (value, value, value)).save(tmp_path / f"t{value}.jpg")
    source = TextureSource.from_config(SynthesisConfig(texture_dir=str(tmp_path)), image_size=8)
    assert len(source) == 3
    textures = source.textures(torch.zeros(60, 3, 8, 8), _gen())
    assert textures.shape == (60, 3, 8, 8)
    means = {round(v, 1) for v in textures.mean(dim=(1, 2, 3)).tolist()}
    assert means == {-1.0, 0.0, 1.0}


def test_missing_or_empty_texture_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        TextureSource.from_folder(tmp_path / "nowhere", image_size=16)
    (tmp_path / "readme.md").write_text("no images here")
    with pytest.raises(ValueError, match="has no images"):
        TextureSource.from_folder(tmp_path, image_size=16)


def test_texture_dir_in_config_requires_loaded_source(tmp_path: Path) -> None:
    config = SynthesisConfig(texture_dir=str(tmp_path))
    with pytest.raises(ValueError, match="texture_dir is set"):
        synthesize_anomalies(_images(), config, _gen())


def test_self_shuffle_without_augmentation_permutes_patches() -> None:
    grid = 4
    images = _images(batch=3, height=32, width=32)
    textures = TextureSource.self_shuffle(grid, augment=False).textures(images, _gen())
    assert not torch.equal(textures, images)
    for image, texture in zip(images, textures, strict=True):
        source = _patches(image, grid)
        shuffled = _patches(texture, grid)
        # Each output patch is one input patch, and every input patch is used exactly once.
        matches = [next(i for i, p in enumerate(source) if torch.equal(p, q)) for q in shuffled]
        assert sorted(matches) == list(range(grid * grid))


def test_self_shuffle_leaves_leftover_border_in_place() -> None:
    images = _images(batch=2, height=18, width=19)
    textures = TextureSource.self_shuffle(4, augment=False).textures(images, _gen())
    assert torch.equal(textures[..., 16:, :], images[..., 16:, :])
    assert torch.equal(textures[..., :, 16:], images[..., :, 16:])


def test_self_shuffle_with_augmentation_keeps_pixels_up_to_brightness_and_contrast() -> None:
    # Inputs small enough that jitter never clamps: rotation, flips and shuffling only move
    # pixels, and jitter is affine, so sorted output = contrast * sorted input + offset.
    images = _images(batch=6, height=32, width=32) * 0.2
    textures = TextureSource.self_shuffle(4).textures(images, _gen(2))
    for image, texture in zip(images, textures, strict=True):
        x = image.flatten().sort().values.double()
        y = texture.flatten().sort().values.double()
        design = torch.stack([x, torch.ones_like(x)], dim=1)
        coef = torch.linalg.lstsq(design, y[:, None]).solution.flatten()
        assert 0.69 < coef[0] < 1.31
        assert (design @ coef - y).abs().max() < 1e-5
        assert not torch.equal(texture, image)


def test_rejects_non_rgb_batches() -> None:
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        synthesize_anomalies(torch.zeros(2, 1, 8, 8), SynthesisConfig(), _gen())
