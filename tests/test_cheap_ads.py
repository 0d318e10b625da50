"""Cheaper ADS checks: the same decisions as the paper's check where they must agree, for less."""

from __future__ import annotations

import torch
from torch import nn

from model.config import ADSConfig, DiffusionConfig
from model.diffusion import Space, build_noise_schedule
from model.features import FeatureExtractor
from model.reconstruct import Reconstruction, ddim_timesteps, reconstruct

ALPHAS = build_noise_schedule(DiffusionConfig()).alphas_cumprod
ADS = ADSConfig(start_step=600, num_steps=6, delta=0.02, t_min=300, top_k=4, undecided="input")
STEPS = [t for t, _ in ddim_timesteps(ADS.start_step, ADS.num_steps)]
# Per-sample drift of the denoiser inside a square: none (a normal part), strong, mild.
OFFSETS = torch.tensor([0.0, 0.3, 0.1])


class CountingFeatures:
    """4x4 pixel patches as features, counting how many images went through."""

    def __init__(self) -> None:
        self.net = FeatureExtractor(nn.Sequential(nn.PixelUnshuffle(4)), (0,))
        self.images = 0

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        self.images += images.shape[0]
        return self.net(images)


def _run(config: ADSConfig) -> tuple[Reconstruction, int]:
    """An oracle denoiser: the noise that leads back to the input, pushed off it in a square."""
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 1.6 - 0.8
    region = torch.zeros(1, 3, 32, 32)
    region[..., 8:24, 8:24] = 1.0

    def denoise(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = ALPHAS[t].view(-1, 1, 1, 1)
        return (z - torch.sqrt(a) * images) / torch.sqrt(1 - a) + OFFSETS.view(-1, 1, 1, 1) * region

    features = CountingFeatures()
    space = Space(DiffusionConfig(space="pixel"), features)
    return reconstruct(denoise, space, ALPHAS, images, config, 0), features.images


def test_the_paper_check_decides_as_expected_and_skips_the_first_step() -> None:
    out, images = _run(ADS)
    assert out.denoise_steps.tolist() == [0, STEPS[1], STEPS[2]]
    # Checks at steps 1..5 only (x0_in is x0_hat at the first): sample 1 leaves after step 1,
    # sample 2 after step 2, sample 0 stays: 2 images per open sample per check.
    assert images == 2 * (3 + 2 + 1 + 1 + 1)


def test_no_checks_after_the_snap_keeps_the_steps_and_saves_checks() -> None:
    full, full_images = _run(ADS)
    cheap, cheap_images = _run(ADS.model_copy(update={"checks_after_snap": False}))
    assert cheap.denoise_steps.tolist() == full.denoise_steps.tolist()
    torch.testing.assert_close(cheap.images, full.images)
    # The first snap is at t = 200 (below t_min 300); the check at t = 100 is skipped.
    assert cheap_images == full_images - 2


def test_checks_every_k_steps_keep_decisions_that_fall_on_a_checked_step() -> None:
    full, full_images = _run(ADS)
    every2, every2_images = _run(ADS.model_copy(update={"check_every": 2}))
    # Sample 2 decides at step 2, which is checked; sample 1 decided at step 1, which is not,
    # so it decides at the next checked step.
    assert every2.denoise_steps.tolist() == [0, STEPS[2], STEPS[2]]
    assert full.denoise_steps[2] == every2.denoise_steps[2]
    assert every2_images < full_images


def test_the_input_reference_featurises_the_input_once_and_half_as_much_per_check() -> None:
    cheap, images = _run(ADS.model_copy(update={"check_reference": "input"}))
    # The normal part never decides; the drifting ones are seen from the very first step,
    # since the input itself, not its noisy clean estimate, is the reference.
    assert cheap.denoise_steps.tolist() == [0, STEPS[0], STEPS[0]]
    # The input once (3), then one image per open sample per check: 3 at step 0, 1 after.
    assert images == 3 + 3 + 1 + 1 + 1 + 1 + 1
