"""The paper preset built directly as an Inspector, for speed measurement and experiments.

Stable Diffusion v1.4's UNet and VAE (model.sd), classifier-free guidance at scale 9 with a
fixed prompt, DINO ViT-B/8 features, 512 px, 25 DDIM steps from t = 750 with a check at every
step. Parts given no weights are random (and it warns). A product line serves the authors'
checkpoints through a model folder written by `glad import` (model.importer) instead.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from model.calibrate import calibrated
from model.config import PRESETS, Calibration, GladConfig
from model.diffusion import VaeSpace
from model.features import build_feature_extractor
from model.inspector import Inspector
from model.pipeline import GladPipeline, inference_dtype
from model.sd import (
    SD_VAE_CHANNELS,
    GuidedDenoiser,
    build_sd_unet,
    build_sd_vae,
    diffusers_weights,
    place,
    prompt_embeddings,
    random_prompt_embeddings,
    read_diffusers_model,
)


class RandomWeightsWarning(UserWarning):
    """A model is running at random weights: its scores mean nothing."""


def _read_folder(kind: type[UNet2DConditionModel] | type[AutoencoderKL], folder: Path) -> Any:
    return read_diffusers_model(kind, folder / "config.json", diffusers_weights(folder))


def paper_inspector(
    sd_folder: Path | None = None,
    unet_folder: Path | None = None,
    dino_weights: Path | None = None,
    *,
    config: GladConfig = PRESETS["paper"],
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    prompt: str = "",
    vae_channels: tuple[int, ...] = SD_VAE_CHANNELS,
    calibration: Calibration | None = None,
) -> Inspector:
    """The authors' recipe as an Inspector; parts without weights are random (and it warns).

    sd_folder: a diffusers Stable Diffusion v1.x folder (vae/, unet/, and text_encoder/ or a
    PROMPT_FILE); unet_folder: a diffusers UNet folder, in place of sd_folder/unet;
    dino_weights: the official dino_vitbase8_pretrain.pth. Only local files are read.
    """
    dev = torch.device(device)
    dtype = dtype or inference_dtype(dev)
    random_parts = []
    if sd_folder is None:
        random_parts.append("VAE")
        vae = build_sd_vae(vae_channels, config.diffusion.norm_num_groups)
        cond, uncond = random_prompt_embeddings()
    else:
        vae = _read_folder(AutoencoderKL, Path(sd_folder) / "vae")
        cond, uncond = prompt_embeddings(Path(sd_folder), unet_folder, prompt)
    unet_path = (
        Path(unet_folder) if unet_folder else (Path(sd_folder) / "unet" if sd_folder else None)
    )
    if unet_path is None:
        random_parts.append("UNet")
        unet = build_sd_unet(config.diffusion, config.image_size)
    else:
        unet = _read_folder(UNet2DConditionModel, unet_path)
    if dino_weights is None:
        random_parts.append("DINO")
    features_config = config.features.model_copy(
        update={"weights": None if dino_weights is None else str(dino_weights)}
    )
    if random_parts:
        warnings.warn(
            f"paper preset at RANDOM weights ({', '.join(random_parts)}): its scores mean "
            "nothing; use it to measure speed only",
            RandomWeightsWarning,
            stacklevel=2,
        )
    scale = config.diffusion.guidance_scale
    denoiser = place(GuidedDenoiser(unet, cond, uncond, scale), dev, dtype)
    space = VaeSpace(config.diffusion, vae, build_feature_extractor(features_config))
    pipeline = GladPipeline(config, denoiser, place(space, dev, dtype), device=dev, dtype=dtype)
    if calibration is not None:
        pipeline = calibrated(pipeline, calibration, {})
    version = "paper-random" if random_parts else "paper"
    return Inspector(pipeline, calibration, version, random_weights=bool(random_parts))
