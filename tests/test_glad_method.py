"""The method's own mechanics: ATP's target, ADS decisions in mixed batches, SAFF's mask."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from model.config import PAPER, ADSConfig, DiffusionConfig, FeatureConfig, GladConfig
from model.diffusion import Space, add_noise, atp_target, build_noise_schedule, predicted_clean
from model.features import FeatureExtractor
from model.pipeline import (
    Denoiser,
    GladPipeline,
    Reconstruction,
    ddim_timesteps,
    saff_fuse,
    saff_mask,
)
from model.train import atp_loss

ALPHAS = build_noise_schedule(DiffusionConfig()).alphas_cumprod
# The paper's rule for undecided samples; the compact preset's restart has tests of its own.
ADS = ADSConfig(start_step=600, num_steps=6, delta=0.05, t_min=300, top_k=4, undecided="input")
# 32 px images diffused as pixels; the ADS layer is the stand-in features' only one (0).
PIXEL_CONFIG = GladConfig(
    image_size=32,
    diffusion=DiffusionConfig(space="pixel"),
    features=FeatureConfig(ads_layer=0, score_layers=(0,)),
)


def test_a_unet_narrower_than_its_sample_is_rejected() -> None:
    # Patch 8 folds 192 channels; a 32-wide first level cannot carry the noise through.
    patch8 = {"space": "patch", "patch_size": 8, "block_out_channels": (32, 64)}
    with pytest.raises(ValidationError, match=r"block_out_channels\[0\] \(32\).*192"):
        GladConfig(diffusion=DiffusionConfig(**patch8))
    patch4 = DiffusionConfig(space="patch", patch_size=4, block_out_channels=(64, 128))
    assert GladConfig(diffusion=patch4).sample_channels == 48
    # Feature space stacks the score layers: MobileNetV2 layers 6 and 10 give 32 + 64.
    assert GladConfig().sample_channels == 96 and GladConfig().fold == 8
    narrow = DiffusionConfig(block_out_channels=(64, 128))
    with pytest.raises(ValidationError, match=r"\(64\).*96 channels of a features sample"):
        GladConfig(diffusion=narrow)


def test_atp_target_implies_the_normal_image() -> None:
    g = torch.Generator().manual_seed(0)
    z_normal, z_anomalous, noise = (torch.randn(4, 12, 8, 8, generator=g) for _ in range(3))
    for t in (1, 100, 500, 999):
        alpha_bar = ALPHAS[t]
        share = t / 1000
        z_mixed = share * z_anomalous + (1 - share) * z_normal
        z_t = add_noise(z_mixed, noise, alpha_bar)
        target = atp_target(noise, z_mixed, z_normal, alpha_bar)
        implied = predicted_clean(z_t, target, alpha_bar)
        torch.testing.assert_close(implied, z_normal, atol=1e-3, rtol=1e-4)
        # And it differs from plain noise wherever the anomaly was blended in.
        assert not torch.allclose(target, noise)


def _pixel_features() -> FeatureExtractor:
    # 4x4 pixel patches as 48-d features: a transparent stand-in for a CNN here.
    return FeatureExtractor(nn.Sequential(nn.PixelUnshuffle(4)), (0,))


def _oracle_denoiser(images: torch.Tensor, offsets: torch.Tensor, blind: bool = False):
    """Predicts the true noise, plus a per-sample offset inside a square region.

    The true noise takes z back onto the input; a blind one always says the start noise.
    """
    space = Space(DiffusionConfig(space="pixel"), _pixel_features())
    z_in = space.encode(images)
    eps = torch.randn((1, *z_in.shape[1:]), generator=torch.Generator().manual_seed(0))
    region = torch.zeros_like(z_in[:1])
    region[..., 8:24, 8:24] = 1.0

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ALPHAS[t].view(-1, 1, 1, 1)
        # The noise that would take z back onto the input exactly, then pushed off it.
        true_eps = eps.expand_as(z) if blind else (z - torch.sqrt(a) * z_in) / torch.sqrt(1 - a)
        return true_eps + offsets.view(-1, 1, 1, 1) * region

    return denoise, space, region


def _reconstruct(denoise: Denoiser, space: Space, images: torch.Tensor, ads: ADSConfig):
    return GladPipeline(PIXEL_CONFIG, denoise, space).reconstruct(images, ads)


def _run(images: torch.Tensor, offsets: torch.Tensor, config: ADSConfig = ADS, blind: bool = False):
    denoise, space, _ = _oracle_denoiser(images, offsets, blind)
    return _reconstruct(denoise, space, images, config)


def _images(n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 32, 32, generator=g) * 1.6 - 0.8


def test_a_sample_that_matches_its_input_never_decides_and_is_returned() -> None:
    images = _images(1)
    out = _run(images, torch.tensor([0.0]))
    assert out.denoise_steps.tolist() == [0]
    torch.testing.assert_close(out.images, images, atol=1e-4, rtol=0)


def test_a_sample_that_drifts_stops_at_the_first_check_past_delta() -> None:
    images = _images(1)
    steps = [t for t, _ in ddim_timesteps(ADS.start_step, ADS.num_steps)]
    # At the first step x0_hat equals x0_in, so the earliest possible decision is the second.
    assert _run(images, torch.tensor([0.3])).denoise_steps.tolist() == [steps[1]]
    # A milder drift shows more slowly: its discrepancy (0.012, 0.023, ...) passes 0.02 at the
    # third step, and that is where it stops.
    mild = _run(images, torch.tensor([0.1]), ADS.model_copy(update={"delta": 0.02}))
    assert mild.denoise_steps.tolist() == [steps[2]]
    # With a delta no discrepancy can pass, nothing decides.
    never = _run(images, torch.tensor([0.3]), ADS.model_copy(update={"delta": 2.5}))
    assert never.denoise_steps.tolist() == [0]


def test_a_sample_below_delta_is_snapped_to_its_input_under_t_min() -> None:
    images = _images(1)
    small = torch.tensor([0.02])
    snapped = _run(images, small, blind=True)
    free = _run(images, small, ADS.model_copy(update={"t_min": 0}), blind=True)
    assert snapped.denoise_steps.tolist() == free.denoise_steps.tolist() == [0]
    # Snapped at the last step, the output is x0_in there: the input moved by the noise error.
    _, _, region = _oracle_denoiser(images, small, blind=True)
    t_last = ddim_timesteps(ADS.start_step, ADS.num_steps)[-1][0]
    a = ALPHAS[t_last]
    expected = images - torch.sqrt((1 - a) / a) * 0.02 * region
    torch.testing.assert_close(snapped.images, expected, atol=1e-5, rtol=0)
    assert (free.images - expected).abs().max() > 1e-3


def test_an_undecided_sample_restarts_from_its_input_at_t_min() -> None:
    # Sample 0 drifts past delta at once; sample 1 drifts too little to ever pass it.
    images = _images(2)
    offsets = torch.tensor([0.3, 0.02])
    restart = ADS.model_copy(update={"undecided": "restart"})
    out = _run(images, offsets, restart, blind=True)
    snapped = _run(images, offsets, blind=True)
    assert out.denoise_steps.tolist() == snapped.denoise_steps.tolist()
    assert out.denoise_steps[0] > 300 and out.denoise_steps[1] == 0
    # The decided sample is untouched by the rule for undecided ones.
    torch.testing.assert_close(out.images[0], snapped.images[0], atol=1e-6, rtol=0)
    # The undecided one is the plain reconstruction from t_min (300, on the grid), not its
    # input: its drift, which the map must see, is still there.
    plain = ADS.model_copy(update={"adaptive": False, "start_step": 300, "num_steps": 3})
    from_t_min = _run(images[1:], offsets[1:], plain, blind=True)
    torch.testing.assert_close(out.images[1], from_t_min.images[0], atol=1e-5, rtol=0)
    assert (out.images[1] - snapped.images[1]).abs().max() > 1e-3
    # Nothing decides after the restart: its checks would compare the input with itself.
    late = _run(images, torch.tensor([0.0, 0.3]), restart.model_copy(update={"t_min": 550}))
    assert late.denoise_steps.tolist() == [0, 0]


@pytest.mark.parametrize("undecided", ["input", "restart"])
def test_mixed_batch_decides_per_sample_as_each_would_alone(undecided: str) -> None:
    images = _images(3)
    offsets = torch.tensor([0.0, 0.3, 0.02])
    config = ADS.model_copy(update={"undecided": undecided})
    together = _run(images, offsets, config)
    for i in range(3):
        alone = _run(images[i : i + 1], offsets[i : i + 1], config)
        assert together.denoise_steps[i] == alone.denoise_steps[0]
        torch.testing.assert_close(together.images[i], alone.images[0], atol=1e-5, rtol=0)
    assert together.denoise_steps[1] > 0 and together.denoise_steps[0] == 0


def test_saff_mask_is_a_weight_in_unit_range_that_grows_with_discrepancy() -> None:
    a_map = torch.linspace(0, 2, 16).view(1, 4, 4)
    mask = saff_mask(a_map, (8, 8), ADSConfig())
    assert mask.shape == (1, 1, 8, 8)
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0
    # By default the mask is centred on delta: half the reconstruction where A equals it.
    centred = saff_mask(torch.tensor([[[0.0, 0.4, 0.8]]]), (1, 3), ADSConfig(delta=0.4))
    torch.testing.assert_close(centred[0, 0, 0, 1], torch.tensor(0.5))
    assert float(centred[0, 0, 0, 0]) < 0.02 and float(centred[0, 0, 0, 2]) > 0.98
    paper = saff_mask(torch.zeros(1, 2, 2), (2, 2), PAPER.ads)
    torch.testing.assert_close(paper, torch.full((1, 1, 2, 2), 0.5))
    sharp = saff_mask(a_map, (4, 4), ADSConfig(saff_center=1.0, saff_temperature=0.05))
    assert float(sharp[0, 0, 0, 0]) < 0.01 and float(sharp[0, 0, -1, -1]) > 0.99
    assert torch.all(sharp.flatten().diff() >= 0)


def test_without_ads_nothing_decides_or_snaps() -> None:
    images = _images(2)
    offsets = torch.tensor([0.3, 0.02])
    plain = _run(images, offsets, ADS.model_copy(update={"adaptive": False}), blind=True)
    free = _run(images, offsets, ADS.model_copy(update={"t_min": 0, "delta": 9.0}), blind=True)
    assert plain.denoise_steps.tolist() == [0, 0]
    torch.testing.assert_close(plain.images, free.images)


def test_without_saff_a_decided_sample_keeps_the_plain_reconstruction() -> None:
    images = _images(1)
    offsets = torch.tensor([0.3])
    fused = _run(images, offsets)
    plain = _run(images, offsets, ADS.model_copy(update={"saff": False}))
    assert fused.denoise_steps.tolist() == plain.denoise_steps.tolist() != [0]
    assert not torch.allclose(fused.images, plain.images)


def test_saff_takes_the_reconstruction_where_the_discrepancy_is_high_and_the_input_elsewhere() -> (
    None
):
    x0_hat, x0_in = torch.full((1, 2, 4, 4), 1.0), torch.full((1, 2, 4, 4), -1.0)
    a_map = torch.zeros(1, 4, 4)
    a_map[0, :2] = 10.0  # far above delta in the top half; zero, 4 temperatures below, under it
    fused = saff_fuse(x0_hat, x0_in, a_map, ADSConfig(delta=0.4))
    torch.testing.assert_close(fused[..., :2, :], x0_hat[..., :2, :], atol=1e-6, rtol=0)
    # sigmoid(-4): 1.8 % of the reconstruction is left where the discrepancy is zero.
    torch.testing.assert_close(fused[..., 2:, :], x0_in[..., 2:, :], atol=0.04, rtol=0)


class _NoiseOracle(nn.Module):
    """A stand-in UNet that predicts the noise implying a given clean sample at each t."""

    def __init__(self, clean: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.clean = clean

    def forward(self, z_t: torch.Tensor, t: torch.Tensor) -> SimpleNamespace:
        a = ALPHAS.double()[t].view(-1, 1, 1, 1)
        return SimpleNamespace(sample=(z_t - torch.sqrt(a) * self.clean(t)) / torch.sqrt(1 - a))


def test_atp_loss_trains_the_denoiser_to_imply_the_normal_image_not_the_blended_one() -> None:
    g = torch.Generator().manual_seed(2)
    normal, anomalous = (torch.rand(8, 3, 16, 16, generator=g, dtype=torch.float64) for _ in "ab")
    space = Space(DiffusionConfig(space="pixel"))

    def blended(t: torch.Tensor) -> torch.Tensor:
        share = (t.double() / len(ALPHAS)).view(-1, 1, 1, 1)
        return share * anomalous + (1 - share) * normal

    def loss(oracle: nn.Module) -> float:
        seed = torch.Generator().manual_seed(3)
        return float(atp_loss(oracle, space, ALPHAS.double(), normal, anomalous, seed))

    # The denoiser that always implies the normal image is ATP's optimum; one that predicts
    # the noise actually added (plain DDPM's target, implying the blend) is not.
    assert loss(_NoiseOracle(lambda t: normal)) < 1e-12
    assert loss(_NoiseOracle(blended)) > 1e-2


class CountingFeatures:
    """4x4 pixel patches as features, counting how many images went through."""

    def __init__(self) -> None:
        self.net = _pixel_features()
        self.images = 0

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        self.images += images.shape[0]
        return self.net(images)


# Per-sample drift of the denoiser inside a square: none (a normal part), strong, mild.
DRIFTS = torch.tensor([0.0, 0.3, 0.1])
CHECKED = ADS.model_copy(update={"delta": 0.02})


def _counted(config: ADSConfig) -> tuple[Reconstruction, int]:
    """The oracle denoiser on three drifts, and how many images the features saw."""
    images = _images(3)
    denoise, _, _ = _oracle_denoiser(images, DRIFTS)
    features = CountingFeatures()
    space = Space(DiffusionConfig(space="pixel"), features)
    return _reconstruct(denoise, space, images, config), features.images


def test_the_paper_check_decides_as_expected_and_skips_the_first_step() -> None:
    out, images = _counted(CHECKED)
    steps = [t for t, _ in ddim_timesteps(CHECKED.start_step, CHECKED.num_steps)]
    assert out.denoise_steps.tolist() == [0, steps[1], steps[2]]
    # Checks at steps 1..5 only (x0_in is x0_hat at the first): sample 1 leaves after step 1,
    # sample 2 after step 2, sample 0 stays: 2 images per open sample per check; and the 3
    # inputs once at step 1, whose own features the map and the memory use.
    assert images == 2 * (3 + 2 + 1 + 1 + 1) + 3


def test_checks_every_k_steps_keep_decisions_that_fall_on_a_checked_step() -> None:
    full, full_images = _counted(CHECKED)
    every2, every2_images = _counted(CHECKED.model_copy(update={"check_every": 2}))
    steps = [t for t, _ in ddim_timesteps(CHECKED.start_step, CHECKED.num_steps)]
    # Sample 2 decides at step 2, which is checked; sample 1 decided at step 1, which is not,
    # so it decides at the next checked step.
    assert every2.denoise_steps.tolist() == [0, steps[2], steps[2]]
    assert full.denoise_steps[2] == every2.denoise_steps[2]
    assert every2_images < full_images
