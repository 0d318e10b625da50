"""The diffusion pieces: the space it runs in, the UNet, the noise schedule, the ATP target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import nn

from model.config import DiffusionConfig


class Space(nn.Module):
    """Maps images in [-1, 1] to the tensor the diffusion runs on, and back.

    "patch" folds each p x p pixel patch into channels: a lossless, free stand-in for a VAE
    latent that shrinks the UNet's spatial size by p^2 without any pretrained weights.
    """

    def __init__(self, config: DiffusionConfig) -> None:
        super().__init__()
        self.fold = config.patch_size if config.space == "patch" else 1

    @property
    def channels(self) -> int:
        return 3 * self.fold * self.fold

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.fold) if self.fold > 1 else images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.fold) if self.fold > 1 else latents


class VaeSpace(Space):
    """Stable Diffusion's latent: encode = the posterior mean, scaled to unit variance."""

    def __init__(self, config: DiffusionConfig, vae: AutoencoderKL) -> None:
        super().__init__(config)
        self.vae = vae
        self.fold = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling = float(vae.config.scaling_factor)

    @property
    def channels(self) -> int:
        return int(self.vae.config.latent_channels)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mean * self.scaling

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents / self.scaling).sample


class UNetDenoiser(nn.Module):
    """eps_theta(z_t, t) from an unconditional diffusers UNet."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t).sample


def build_unet(config: DiffusionConfig, image_size: int) -> UNet2DModel:
    """The denoiser: diffusers' UNet2DModel sized by the config."""
    space = Space(config)
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in config.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(config.attention_levels))
    return UNet2DModel(
        sample_size=image_size // space.fold,
        in_channels=space.channels,
        out_channels=space.channels,
        block_out_channels=config.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=config.layers_per_block,
        norm_num_groups=config.norm_num_groups,
    )


def build_noise_schedule(config: DiffusionConfig) -> DDPMScheduler:
    """diffusers' DDPM scheduler: alpha_bar_t for training and for the DDIM sampler."""
    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule=config.beta_schedule,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
    )


def atp_target(
    noise: torch.Tensor, z_mixed: torch.Tensor, z_normal: torch.Tensor, alpha_bar: torch.Tensor
) -> torch.Tensor:
    """ATP's noise target: the noise whose implied clean image is the normal one.

    With z_t = sqrt(a) z_mixed + sqrt(1 - a) noise, solving
    (z_t - sqrt(1 - a) target) / sqrt(a) = z_normal for the target gives this form.
    """
    return noise + torch.sqrt(alpha_bar / (1.0 - alpha_bar)) * (z_mixed - z_normal)


def add_noise(z: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """q(z_t | z_0): the forward process at the given alpha_bar (broadcast per sample)."""
    return torch.sqrt(alpha_bar) * z + torch.sqrt(1.0 - alpha_bar) * noise


def predicted_clean(z_t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 implied by a noisy sample and a noise estimate."""
    return (z_t - torch.sqrt(1.0 - alpha_bar) * eps) / torch.sqrt(alpha_bar)
