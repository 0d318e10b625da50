"""`glad import`: the authors' GLAD checkpoints as a product's model folder.

The authors' recipe leaves three things on disk: a Stable Diffusion v1.x folder (diffusers'
layout: vae/, unet/, scheduler/, text_encoder/, tokenizer/), the fine-tuned UNet (an
accelerate `checkpoint-N/` folder holding the UNet's state dict, a diffusers UNet folder, or
the state dict's file), and DINO ViT-B/8's `dino_vitbase8_pretrain.pth`. The model folder
written here records each file it needs with its SHA-256 (or copies them in), holds the prompt
embeddings so serving needs no text encoder, and is calibrated on the product's good images as
a trained compact model is.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.calibrate import calibrate
from model.checkpoint import save_model_folder, sha256
from model.config import AUTHORS_PROMPT, PRESETS, Calibration, GladConfig, SourceFile
from model.data import load_uint8, training_images
from model.pipeline import GladPipeline, inference_dtype
from model.sd import (
    PROMPT_KEYS,
    diffusers_weights,
    paper_parts,
    prompt_embeddings,
    read_config,
)
from model.train import check_out_folder

# What accelerate's save_state writes for the one model it trains, newest format first.
ACCELERATE_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# Where --copy puts the files, inside the model folder, by role.
COPIED = {
    "vae_config": "sources/vae/config.json",
    "vae_weights": "sources/vae/",
    "unet_config": "sources/unet/config.json",
    "unet_weights": "sources/unet/",
    "dino_weights": "sources/dino/",
}


@dataclass(frozen=True)
class ImportResult:
    folder: Path
    calibration: Calibration
    num_images: int
    copied: bool


def unet_files(unet: Path | None, sd: Path) -> tuple[Path, Path]:
    """(config.json, weights file) of the UNet to serve.

    unet: an accelerate checkpoint folder or a state dict's file (SD's unet/config.json gives
    the architecture), a diffusers UNet folder, or None for the SD folder's own unet/.
    """
    sd_unet = sd / "unet" / "config.json"
    if unet is None:
        return sd_unet, diffusers_weights(sd / "unet")
    if (unet / "config.json").is_file():
        return unet / "config.json", diffusers_weights(unet)
    weights = unet if unet.is_file() else None
    for name in ACCELERATE_WEIGHTS:
        if weights is None and (unet / name).is_file():
            weights = unet / name
    if weights is None:
        raise ValueError(
            f"--unet {unet}: not a weights file, nor a folder holding config.json (diffusers) "
            f"or {' or '.join(ACCELERATE_WEIGHTS)} (an accelerate checkpoint-N folder)"
        )
    if not sd_unet.is_file():
        raise ValueError(f"{sd_unet} is missing: it gives the architecture of {weights}")
    return sd_unet, weights


def source_files(sd: Path, unet: Path | None, dino: Path) -> dict[str, Path]:
    """The file of each role an imported model is made of, checked to exist."""
    if not sd.is_dir():
        raise ValueError(f"--sd {sd}: no such folder (a diffusers Stable Diffusion v1.x folder)")
    if not dino.is_file():
        raise ValueError(f"--dino {dino}: no such file (dino_vitbase8_pretrain.pth)")
    vae_config = sd / "vae" / "config.json"
    if not vae_config.is_file():
        raise ValueError(
            f"{vae_config} is missing: --sd must be a diffusers Stable Diffusion folder"
        )
    unet_config, unet_weights = unet_files(unet, sd)
    return {
        "vae_config": vae_config,
        "vae_weights": diffusers_weights(sd / "vae"),
        "unet_config": unet_config,
        "unet_weights": unet_weights,
        "dino_weights": dino,
    }


def imported_config(
    base: GladConfig, unet_config: Path, scheduler_config: Path, image_size: int | None
) -> GladConfig:
    """The paper preset, described with the imported UNet's architecture and SD's schedule."""
    if base.diffusion.space != "vae":
        raise ValueError("glad import writes a paper-preset model: the config's space must be vae")
    if base.memory is not None:
        raise ValueError(
            "glad import trains nothing, so there are no training images for a memory of "
            'normal patches: give a config with "memory": null and "maps": ["reconstruction"]'
        )
    unet = read_config(unet_config)
    diffusion: dict[str, Any] = {
        "block_out_channels": tuple(unet["block_out_channels"]),
        "attention_levels": tuple("CrossAttn" in kind for kind in unet["down_block_types"]),
        "layers_per_block": unet["layers_per_block"],
        "norm_num_groups": unet["norm_num_groups"],
    }
    if scheduler_config.is_file():
        schedule = read_config(scheduler_config)
        keys = ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end")
        diffusion |= {key: schedule[key] for key in keys if key in schedule}
    data = base.model_dump()
    data["diffusion"].update(diffusion)
    if image_size is not None:
        data["image_size"] = image_size
    return GladConfig.model_validate(data)


def _copy_in(out: Path, files: dict[str, Path]) -> dict[str, Path]:
    """Copy each file into the model folder; returns the paths relative to it."""
    copied = {}
    for role, path in files.items():
        target = COPIED[role]
        relative = Path(target + path.name) if target.endswith("/") else Path(target)
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / relative)
        copied[role] = relative
    return copied


def import_checkpoints(
    sd: Path,
    unet: Path | None,
    dino: Path,
    data: Path,
    out: Path,
    *,
    base: GladConfig = PRESETS["paper"],
    image_size: int | None = None,
    copy: bool = False,
    prompt: str = AUTHORS_PROMPT,
    device: str = "cpu",
    batch_size: int = 8,
    overwrite: bool = False,
) -> ImportResult:
    """Write a calibrated paper-preset model folder from the authors' checkpoints.

    Every good image in `data` calibrates it (none of them is trained on here; images the
    UNet was fine-tuned on set the threshold lower than unseen ones would). copy=False
    records the files by absolute path; copy=True copies them into `out`.
    """
    check_out_folder(out, resume=False, overwrite=overwrite)
    files = source_files(sd, unet, dino)
    config = imported_config(
        base, files["unet_config"], sd / "scheduler" / "scheduler_config.json", image_size
    )
    paths = training_images(data)
    if len(paths) < 2:
        raise ValueError(f"{len(paths)} images in {data}: calibration needs at least 2")
    unet_folder = unet if unet is not None and unet.is_dir() else None
    cond, uncond = prompt_embeddings(sd, unet_folder, prompt)
    cond_key, uncond_key = PROMPT_KEYS
    weights = {cond_key: cond.float().contiguous(), uncond_key: uncond.float().contiguous()}
    out.mkdir(parents=True, exist_ok=True)
    recorded = _copy_in(out, files) if copy else {r: p.resolve() for r, p in files.items()}
    located = {r: path if path.is_absolute() else out / path for r, path in recorded.items()}
    sources = {
        role: SourceFile(path=str(path), sha256=sha256(located[role]))
        for role, path in recorded.items()
    }
    config = config.model_copy(update={"sources": sources})
    dev = torch.device(device)
    dtype = inference_dtype(dev)
    denoiser, space = paper_parts(out, located, config, weights, dev, dtype)
    pipeline = GladPipeline(config, denoiser, space, device=dev, dtype=dtype)
    images = load_uint8(paths, config.image_size)
    calibration, references = calibrate(pipeline, images, batch_size)
    summary = {
        "imported": True,
        "data": str(data),
        "calibration_files": [p.name for p in paths],
        "num_holdout_images": len(paths),
        "prompt": prompt,
        "copied": copy,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    save_model_folder(out, config, weights, calibration, references, summary)
    return ImportResult(out, calibration, len(paths), copy)
