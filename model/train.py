"""Offline training of one product's GLAD model with ATP (`glad train`)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from tqdm import tqdm

from model.checkpoint import (
    TRAINING,
    rewrite_calibration,
    save_model_folder,
    save_weights,
    with_space_statistics,
    write_json,
)
from model.config import Calibration, GladConfig
from model.data import load_rgb, split_holdout, to_tensor, training_images
from model.diffusion import (
    FeatureSpace,
    Space,
    add_noise,
    atp_target,
    build_noise_schedule,
    build_space,
    build_unet,
    feature_statistics,
)
from model.features import build_feature_extractor
from model.inspector import Inspector
from model.scoring import calibrate
from model.synthesis import TextureSource, synthesize_anomalies

RESUME_DIR = "resume"


@dataclass(frozen=True)
class TrainResult:
    folder: Path
    steps: int
    seconds: float
    final_loss: float
    calibration: Calibration


def load_uint8(paths: Sequence[Path], size: int) -> torch.Tensor:
    """Images as uint8 (N, 3, S, S), resized to the model's size."""
    # uint8 keeps a few thousand 256 px images in memory at a quarter of float32's size.
    return ((to_tensor([load_rgb(p) for p in paths], size) + 1) * 127.5).round().to(torch.uint8)


def _step_generator(seed: int, step: int) -> torch.Generator:
    # One generator per step: a resumed run draws exactly what an unbroken run would.
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def atp_loss(
    unet: UNet2DModel,
    space: Space,
    alphas_cumprod: torch.Tensor,
    normal: torch.Tensor,
    anomalous: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """ATP: noise a normal/anomalous blend; the target's implied clean image is the normal one."""
    batch = normal.shape[0]
    num_t = alphas_cumprod.shape[0]
    with torch.no_grad():
        z_normal, z_anomalous = space.encode(torch.cat([normal, anomalous])).chunk(2)
    t = torch.randint(0, num_t, (batch,), generator=generator)
    share = (t.float() / num_t).view(-1, 1, 1, 1).to(normal)  # more anomaly at high noise
    z_mixed = share * z_anomalous + (1 - share) * z_normal
    noise = torch.randn(z_normal.shape, generator=generator).to(normal)
    alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1).to(normal)
    target = atp_target(noise, z_mixed, z_normal, alpha_bar)
    with torch.autocast("cuda", dtype=torch.float16, enabled=normal.is_cuda):
        pred = unet(add_noise(z_mixed, noise, alpha_bar), t.to(normal.device)).sample
    return F.mse_loss(pred.float(), target.float())


def _save_resume(
    folder: Path,
    step: int,
    config: GladConfig,
    unet: UNet2DModel,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    seconds: float,
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": v for k, v in unet.state_dict().items()}
    tensors |= {f"ema.{i}": p for i, p in enumerate(ema.shadow_params)}
    opt = optimizer.state_dict()
    for index, state in opt["state"].items():
        tensors |= {f"optim.{index}.{k}": v for k, v in state.items()}
    save_weights(folder / "state.safetensors", tensors)
    write_json(
        folder / "state.json",
        {
            "step": step,
            "seconds": seconds,
            "config": config.model_dump(mode="json"),
            "param_groups": opt["param_groups"],
            "ema_optimization_step": ema.optimization_step,
            "scaler": scaler.state_dict(),
        },
    )


def _resumable(config: GladConfig) -> dict[str, Any]:
    """What must match to resume: everything but how long to train and how often to save."""
    data = config.model_dump()
    for key in ("steps", "checkpoint_every"):
        del data["training"][key]
    return data


def _load_resume(
    folder: Path,
    config: GladConfig,
    unet: UNet2DModel,
    ema: EMAModel,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> tuple[int, float]:
    meta = json.loads((folder / "state.json").read_text())
    if _resumable(GladConfig.model_validate(meta["config"])) != _resumable(config):
        raise ValueError(f"cannot resume from {folder}: it was trained with another config")
    tensors = load_file(str(folder / "state.safetensors"))
    unet.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    for i, p in enumerate(ema.shadow_params):
        p.copy_(tensors[f"ema.{i}"])
    ema.optimization_step = meta["ema_optimization_step"]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    if meta["scaler"]:
        scaler.load_state_dict(meta["scaler"])
    return int(meta["step"]), float(meta["seconds"])


def ema_unet(unet: UNet2DModel, ema: EMAModel) -> UNet2DModel:
    """A copy of the UNet holding the EMA weights, which are what gets served."""
    averaged = copy.deepcopy(unet)
    ema.copy_to(averaged.parameters())
    return averaged


def held_out_images(config: GladConfig, data: Path) -> torch.Tensor:
    """The held-out normal training images that calibrate a model, uint8 (N, 3, S, S)."""
    _, held_paths = split_holdout(training_images(data), config.training.holdout_every)
    return load_uint8(held_paths, config.image_size)


def calibrate_delta(inspector: Inspector, images: torch.Tensor, batch_size: int) -> float | None:
    """The product's ADS delta from held-out normal images (uint8), or None where the config
    fixes it: the margin times the largest discrepancy a normal part shows at a check."""
    ads = inspector.config.ads
    if not ads.adaptive or ads.delta_margin is None:
        return None
    # A probe where nothing may decide shows how far normal parts drift at the checks.
    probe = ads.model_copy(update={"delta": float("inf")})
    peaks = [
        inspector.reconstruct(chunk.float() / 127.5 - 1, probe)[1].peak_discrepancy.cpu()
        for chunk in images.split(batch_size)
    ]
    return ads.delta_margin * float(torch.cat(peaks).max())


def calibrate_model(
    inspector: Inspector, images: torch.Tensor, batch_size: int
) -> tuple[Calibration, torch.Tensor]:
    """ADS delta, reference map, threshold and normalisation from held-out normal images.

    Never test data. `inspector` must be uncalibrated, so its maps are the raw ones.
    """
    delta = calibrate_delta(inspector, images, batch_size)
    ads = inspector.config.ads
    if delta is not None:
        ads = ads.model_copy(update={"delta": delta})
    maps = torch.cat(
        [
            inspector.run(chunk.float() / 127.5 - 1, ads).maps.cpu()
            for chunk in images.split(batch_size)
        ]
    )
    calibration, reference_map = calibrate(maps, inspector.config.scoring)
    return calibration.model_copy(update={"ads_delta": delta}), reference_map


def recalibrate(folder: Path, data: Path, device: str = "cpu") -> Calibration:
    """Calibrate a trained model folder afresh (`glad calibrate`): ADS delta, reference map,
    threshold and normalisation, from the same held-out training images it was trained beside.
    """
    inspector = Inspector.load(folder, device, calibrated=False)
    config = inspector.config
    training = json.loads((folder / TRAINING).read_text())
    _, held_paths = split_holdout(training_images(data), config.training.holdout_every)
    if training.get("imported"):
        # Nothing was trained here: every good image calibrates an imported model.
        held_paths = training_images(data)
    elif [p.name for p in held_paths] != training.get("holdout_files"):
        raise ValueError(
            f"the held-out images of {data} are not the ones {folder} was trained beside: "
            "calibrating on images it was trained on would set its threshold too low"
        )
    images = load_uint8(held_paths, config.image_size)
    calibration, reference_map = calibrate_model(inspector, images, config.training.batch_size)
    rewrite_calibration(folder, calibration, reference_map)
    return calibration


def training_warnings(config: GladConfig) -> list[str]:
    """What in a training config is legal but almost surely a mistake."""
    cfg = config.training
    if cfg.steps <= cfg.warmup_steps:
        return [
            f"{cfg.steps} steps end inside the {cfg.warmup_steps}-step learning-rate warm-up: "
            "the model never trains at the full rate"
        ]
    return []


def check_out_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing model folder unless asked to resume or replace it."""
    if resume:
        if not (out / RESUME_DIR / "state.json").is_file():
            raise ValueError(
                f"nothing to resume in {out}: no {RESUME_DIR}/state.json (a finished run "
                "keeps it only when trained with --keep-resume)"
            )
        return
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"{out} already exists and is not empty (it may be a served model): pass "
            "--resume to continue its training, --force to train afresh over it, or choose "
            "another --out"
        )


def train(
    config: GladConfig,
    data: Path,
    out: Path,
    device: str = "cpu",
    resume: bool = False,
    progress: bool = True,
    overwrite: bool = False,
    keep_resume: bool = False,
) -> TrainResult:
    """Train on a product's good images, calibrate on held-out ones, write the model folder.

    An existing non-empty `out` is refused unless `resume` (continue its interrupted run) or
    `overwrite`. The resume state is dropped at the end unless `keep_resume`: it is large
    and nothing serves it.
    """
    check_out_folder(out, resume, overwrite)
    if config.diffusion.space == "vae":
        raise ValueError(
            "the paper preset fine-tunes Stable Diffusion, which glad train does not do: "
            "bring the authors' fine-tuned UNet with `glad import`"
        )
    cfg = config.training
    paths = training_images(data)
    train_paths, held_paths = split_holdout(paths, cfg.holdout_every)
    if len(held_paths) < 2:
        raise ValueError(
            f"{len(paths)} images in {data}: need at least {2 * cfg.holdout_every} so that two "
            f"(every {cfg.holdout_every}th) can be held out to calibrate the threshold"
        )
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    images = load_uint8(train_paths, config.image_size)
    held = load_uint8(held_paths, config.image_size)
    space = build_space(config, build_feature_extractor(config.features)).to(dev)
    statistics = None
    if isinstance(space, FeatureSpace):
        statistics = feature_statistics(space, images, cfg.batch_size)
        space = build_space(config, space.features, statistics).to(dev)
    alphas = build_noise_schedule(config.diffusion).alphas_cumprod
    textures = TextureSource.from_config(config.synthesis, config.image_size)

    unet = build_unet(config).to(dev).train()
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
    ema.to(dev)
    scaler = torch.amp.GradScaler("cuda", enabled=dev.type == "cuda")
    start, seconds = 0, 0.0
    resume_dir = out / RESUME_DIR
    if resume:
        start, seconds = _load_resume(resume_dir, config, unet, ema, optimizer, scaler)

    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress)
    loss_value = float("nan")
    began = time.perf_counter() - seconds
    for step in bar:
        generator = _step_generator(cfg.seed, step)
        index = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        normal = images[index].to(dev).float() / 127.5 - 1
        if cfg.horizontal_flip:
            flip = torch.rand(cfg.batch_size, generator=generator) < 0.5
            normal[flip.to(dev)] = normal[flip.to(dev)].flip(-1)
        anomalous, _ = synthesize_anomalies(normal, config.synthesis, generator, textures)
        loss = atp_loss(unet, space, alphas, normal, anomalous, generator)

        for group in optimizer.param_groups:
            group["lr"] = cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        ema.step(unet.parameters())

        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            elapsed = time.perf_counter() - began
            _save_resume(resume_dir, step + 1, config, unet, ema, optimizer, scaler, elapsed)
    seconds = time.perf_counter() - began

    served = ema_unet(unet, ema).eval()
    inspector = Inspector.from_unet(config, served, dev, space_statistics=statistics)
    calibration, reference_map = calibrate_model(inspector, held, cfg.batch_size)
    summary: dict[str, Any] = {
        "data": str(data),
        "num_train_images": len(train_paths),
        "num_holdout_images": len(held_paths),
        "train_files": [p.name for p in train_paths],
        "holdout_files": [p.name for p in held_paths],
        "steps": cfg.steps,
        "seconds": round(seconds, 2),
        "final_loss": loss_value,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    weights = with_space_statistics(served.state_dict(), statistics)
    save_model_folder(out, config, weights, calibration, reference_map, summary)
    if not keep_resume:
        shutil.rmtree(resume_dir)
    return TrainResult(out, cfg.steps, seconds, loss_value, calibration)
