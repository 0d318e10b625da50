"""A model's parts, built and placed: the denoiser and the space (with its features), as an
uncalibrated pipeline, from a trained UNet or a model folder (torch, ONNX or imported)."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DModel
from torch import nn

from model.checkpoint import CheckpointError, ModelFolder, check_weights_fit, split_space_statistics
from model.config import GladConfig
from model.diffusion import Space, UNetDenoiser, build_space, build_unet
from model.features import build_feature_extractor
from model.memory_bank import MemoryBank
from model.ort import load_onnx_parts
from model.pipeline import GladPipeline, inference_dtype
from model.sd import imported_parts

BACKENDS = ("torch", "onnxruntime")


def compact_pipeline(
    config: GladConfig,
    unet: UNet2DModel,
    device: torch.device,
    dtype: torch.dtype | None = None,
    space_statistics: dict[str, torch.Tensor] | None = None,
    space: Space | None = None,
    memory: MemoryBank | None = None,
) -> GladPipeline:
    """A trained UNet with its space: `space` where the caller holds it already (training,
    which moves it), else the config's, with feature space's per-channel mean and std
    (space_statistics, see feature_statistics); and the product's memory, where it has one."""
    dtype = dtype or inference_dtype(device)
    # nn.Module.to: diffusers' override warns on every dtype cast, though this UNet keeps
    # no modules in fp32.
    placed = nn.Module.to(UNetDenoiser(unet), device, dtype).eval().requires_grad_(False)
    if space is None:
        space = build_space(config, build_feature_extractor(config.features), space_statistics)
    return GladPipeline(
        config, placed, space.to(device, dtype), memory=memory, device=device, dtype=dtype
    )


def folder_parts(
    folder: Path,
    loaded: ModelFolder,
    device: torch.device,
    dtype: torch.dtype | None,
    backend: str,
) -> GladPipeline:
    """The uncalibrated pipeline of a loaded model folder on `backend` ("torch", or
    "onnxruntime": the files `glad export` wrote)."""
    config = loaded.config
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use torch or onnxruntime")
    dtype = dtype or inference_dtype(device)
    if config.diffusion.space == "vae":
        if backend != "torch":
            raise CheckpointError(f"{folder}: the paper preset runs on torch only, no ONNX")
        denoiser, space = imported_parts(folder, config, loaded.weights, device, dtype)
        return GladPipeline(config, denoiser, space, device=device, dtype=dtype)
    unet_weights, statistics = split_space_statistics(config, loaded.weights)
    memory = MemoryBank(loaded.memory) if loaded.memory is not None else None
    if backend == "onnxruntime":
        denoiser, features = load_onnx_parts(
            folder, loaded.training["weights_sha256"], config.features, device, dtype
        )
        space = build_space(config, features, statistics).to(device, dtype)
        return GladPipeline(config, denoiser, space, memory=memory, device=device, dtype=dtype)
    unet = build_unet(config)
    check_weights_fit(unet, unet_weights)
    unet.load_state_dict(unet_weights)
    return compact_pipeline(config, unet, device, dtype, statistics, memory=memory)
