"""Feature space: the layer table, stacking and standardising, and describing samples."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.config import BACKBONE_LAYERS, DiffusionConfig, FeatureConfig, GladConfig
from model.diffusion import FeatureSpace, build_space, feature_statistics
from model.dino import load_dino_vitb8
from model.features import build_feature_extractor

SIZE = 64


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_layer_table_matches_mobilenet_v2() -> None:
    layers = tuple(range(len(BACKBONE_LAYERS["mobilenet_v2"])))
    extractor = build_feature_extractor(FeatureConfig(ads_layer=0, score_layers=layers))
    maps = extractor(_images(1))
    config = FeatureConfig()
    for layer in layers:
        channels, stride = config.layer_shape(layer)
        assert tuple(maps[layer].shape[1:]) == (channels, SIZE // stride, SIZE // stride), layer


def test_the_layer_table_matches_dino_vitb8() -> None:
    layers = tuple(range(1, 13))
    maps = load_dino_vitb8(None, layers, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))(_images(1))
    config = FeatureConfig(backbone="dino_vitb8", ads_layer=12, score_layers=(12,))
    for layer in layers:
        channels, stride = config.layer_shape(layer)
        assert tuple(maps[layer].shape[1:]) == (channels, SIZE // stride, SIZE // stride)
    with pytest.raises(ValueError, match="dino_vitb8 has layers 1..12, not 0"):
        FeatureConfig(backbone="dino_vitb8", ads_layer=0, score_layers=(12,))


def _config(**features: object) -> GladConfig:
    return GladConfig(
        image_size=SIZE,
        diffusion=DiffusionConfig(block_out_channels=(64, 96), norm_num_groups=16),
        features=FeatureConfig(**{"ads_layer": 6, "score_layers": (3, 6), **features}),
    )


def test_a_sample_stacks_the_score_layers_on_the_finest_grid() -> None:
    config = _config()
    assert (config.sample_channels, config.fold) == (24 + 32, 4)
    extractor = build_feature_extractor(config.features)
    space = build_space(config, extractor)
    assert isinstance(space, FeatureSpace) and not space.decodable
    images = _images(2)
    z = space.encode(images)
    assert z.shape == (2, 56, 16, 16)
    maps = extractor(images)
    described = space.describe(z)
    torch.testing.assert_close(described[3], maps[3])
    coarse = F.interpolate(maps[6], size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(described[6], coarse)
    assert space.describe_input(z, maps).keys() == described.keys()
    # One pass of the extractor gives the sample and the input's own maps.
    z_again, own = space.encode_with_features(images)
    torch.testing.assert_close(z_again, z)
    torch.testing.assert_close(own[6], maps[6])
    with pytest.raises(RuntimeError, match="no image"):
        space.decode(z)


def test_statistics_standardise_the_training_features() -> None:
    config = _config()
    images = ((_images(6, seed=3) + 1) * 127.5).round().to(torch.uint8)
    plain = build_space(config, build_feature_extractor(config.features))
    assert isinstance(plain, FeatureSpace)
    stats = feature_statistics(plain, images, batch_size=4)
    space = build_space(config, plain.features, stats)
    z = space.encode(images.float() / 127.5 - 1)
    torch.testing.assert_close(z.mean((0, 2, 3)), torch.zeros(56), atol=1e-4, rtol=0)
    live = stats["std"] > 1e-3
    torch.testing.assert_close(z.std((0, 2, 3), correction=0)[live], torch.ones(int(live.sum())))
    # Standardising changes the scale, never what a sample describes.
    torch.testing.assert_close(
        space.describe(z)[3],
        plain.describe(plain.encode(images.float() / 127.5 - 1))[3],
        atol=1e-4,
        rtol=1e-4,
    )


def test_feature_space_rules() -> None:
    with pytest.raises(ValueError, match="ads_layer must be a score layer"):
        _config(ads_layer=10)
    with pytest.raises(ValueError, match="pixel_weight needs an image space"):
        GladConfig.model_validate({**_config().model_dump(), "scoring": {"pixel_weight": 0.5}})
