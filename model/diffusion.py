"""The diffusion pieces: the space it runs in, the UNet, the noise schedule, the ATP target."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
from torch import nn

from model.config import DiffusionConfig, GladConfig
from model.data import from_uint8
from model.features import Features


class Space(nn.Module):
    """Maps images in [-1, 1] to the tensor the diffusion runs on, and says how a sample looks
    to the frozen features that ADS, SAFF and scoring compare.

    "patch" folds each p x p pixel patch into channels: a lossless, free stand-in for a VAE
    latent that shrinks the UNet's spatial size by p^2 without any pretrained weights.
    """

    # Whether decode() gives back an image (feature space has none to give).
    decodable = True

    def __init__(self, config: DiffusionConfig, features: Features | None = None) -> None:
        super().__init__()
        self.fold = config.patch_size if config.space == "patch" else 1
        # Set when the space is used to describe samples (ADS, scoring); encode needs none.
        self.features = features

    @property
    def channels(self) -> int:
        return 3 * self.fold * self.fold

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, self.fold) if self.fold > 1 else images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(latents, self.fold) if self.fold > 1 else latents

    def extract(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        """The frozen features of images in [-1, 1]."""
        if self.features is None:
            raise RuntimeError("this space was built without the features that describe samples")
        return self.features(images)

    def describe(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        """The feature maps of the image a sample stands for: {layer: (B, C, h, w)}."""
        return self.extract(self.decode(latents).clamp(-1, 1))

    def encode_with_features(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """encode(images), and the extractor's own maps of the images: {layer: (B, C, h, w)}."""
        return self.encode(images), self.extract(images)

    def describe_input(
        self, latents: torch.Tensor, features: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        """The input's feature maps, as describe() gives them, from encode_with_features."""
        return features


class VaeSpace(Space):
    """Stable Diffusion's latent: encode = the posterior mean, scaled to unit variance."""

    def __init__(
        self, config: DiffusionConfig, vae: AutoencoderKL, features: Features | None = None
    ) -> None:
        super().__init__(config, features)
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


class FeatureSpace(Space):
    """The frozen extractor's feature maps as the sample: diffusion in a pretrained space.

    The score layers are resized to the finest one's grid, stacked along channels, and
    standardised per channel with the training images' statistics, so the sample has the unit
    scale the noise schedule assumes. It needs no decoder: ADS, SAFF and scoring compare
    samples channel group by channel group, which is each layer's own feature map.
    """

    decodable = False

    def __init__(
        self,
        config: GladConfig,
        features: Features,
        mean: torch.Tensor | None = None,
        std: torch.Tensor | None = None,
    ) -> None:
        super().__init__(config.diffusion, features)
        self.layers = tuple(config.features.score_layers)
        self.widths = [config.features.layer_shape(layer)[0] for layer in self.layers]
        self.fold = config.fold
        self.grid = config.image_size // config.fold
        channels = sum(self.widths)
        shape = (1, channels, 1, 1)
        self.register_buffer("mean", torch.zeros(shape) if mean is None else mean.view(shape))
        self.register_buffer("std", torch.ones(shape) if std is None else std.view(shape))

    @property
    def channels(self) -> int:
        return sum(self.widths)

    def set_statistics(self, statistics: dict[str, torch.Tensor]) -> None:
        """Standardise with these per-channel statistics (feature_statistics) from now on."""
        self.mean.copy_(statistics["mean"].view_as(self.mean))
        self.std.copy_(statistics["std"].view_as(self.std))

    def stack(self, images: torch.Tensor) -> torch.Tensor:
        """The score layers of images on one grid, unstandardised: (B, C, grid, grid)."""
        return self._stacked(self.extract(images))

    def _stacked(self, maps: dict[int, torch.Tensor]) -> torch.Tensor:
        size = (self.grid, self.grid)
        return torch.cat(
            [
                F.interpolate(maps[layer], size=size, mode="bilinear", align_corners=False)
                if maps[layer].shape[-2:] != size
                else maps[layer]
                for layer in self.layers
            ],
            dim=1,
        )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_with_features(images)[0]

    def encode_with_features(
        self, images: torch.Tensor
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        # One pass of the extractor gives the sample and the maps it is stacked from.
        maps = self.extract(images)
        return (self._stacked(maps) - self.mean) / self.std, maps

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("a feature-space sample has no image to decode to")

    def describe(self, latents: torch.Tensor) -> dict[int, torch.Tensor]:
        groups = (latents * self.std + self.mean).split(self.widths, dim=1)
        return dict(zip(self.layers, groups, strict=True))

    def describe_input(
        self, latents: torch.Tensor, features: dict[int, torch.Tensor]
    ) -> dict[int, torch.Tensor]:
        return self.describe(latents)


def build_space(
    config: GladConfig, features: Features | None = None, statistics: dict | None = None
) -> Space:
    """The config's space; feature space takes its per-channel `statistics` (mean, std)."""
    if config.diffusion.space == "features":
        if features is None:
            raise ValueError("feature space needs the feature extractor")
        stats = statistics or {}
        return FeatureSpace(config, features, stats.get("mean"), stats.get("std"))
    if config.diffusion.space == "vae":
        raise ValueError("the VAE space is built by model.sd with Stable Diffusion's VAE")
    return Space(config.diffusion, features)


@torch.no_grad()
def feature_statistics(
    space: FeatureSpace, images: torch.Tensor, batch_size: int
) -> dict[str, torch.Tensor]:
    """Per-channel mean and std of the stacked features of uint8 images (N, 3, S, S)."""
    total = torch.zeros(space.channels, dtype=torch.float64)
    squares = torch.zeros(space.channels, dtype=torch.float64)
    count = 0
    for chunk in images.split(batch_size):
        device = space.mean.device
        stacked = space.stack(from_uint8(chunk.to(device))).double().cpu()
        total += stacked.sum((0, 2, 3))
        squares += stacked.pow(2).sum((0, 2, 3))
        count += stacked.shape[0] * stacked.shape[2] * stacked.shape[3]
    mean = total / count
    # The floor keeps a channel that never varies (dead ReLU) from blowing up.
    std = (squares / count - mean.pow(2)).clamp(min=0).sqrt().clamp(min=1e-3)
    return {"mean": mean.float(), "std": std.float()}


class UNetDenoiser(nn.Module):
    """eps_theta(z_t, t) from an unconditional diffusers UNet."""

    def __init__(self, unet: UNet2DModel) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.unet(z, t).sample


def build_unet(config: GladConfig) -> UNet2DModel:
    """The denoiser: diffusers' UNet2DModel sized by the config."""
    diffusion = config.diffusion
    down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in diffusion.attention_levels)
    up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(diffusion.attention_levels))
    return UNet2DModel(
        sample_size=config.image_size // config.fold,
        in_channels=config.sample_channels,
        out_channels=config.sample_channels,
        block_out_channels=diffusion.block_out_channels,
        down_block_types=down,
        up_block_types=up,
        layers_per_block=diffusion.layers_per_block,
        norm_num_groups=diffusion.norm_num_groups,
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
