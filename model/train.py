"""Offline training of one product's GLAD model with ATP (`glad train`)."""

from __future__ import annotations

import copy
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file
from tqdm import tqdm

from model.calibrate import calibrate
from model.checkpoint import save_model_folder, save_weights, with_space_statistics, write_json
from model.config import Calibration, GladConfig
from model.data import from_uint8, image_files, load_uint8, split_holdout, training_images
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
from model.memory_bank import build_memory_bank
from model.parts import compact_pipeline
from model.synthesis import TextureSource, synthesize_anomalies

RESUME_DIR = "resume"


@dataclass(frozen=True)
class TrainResult:
    folder: Path
    steps: int
    seconds: float
    final_loss: float
    calibration: Calibration


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


@dataclass
class _Optimisation:
    """The UNet in training and everything that steps it, saved together to resume."""

    unet: UNet2DModel
    optimizer: torch.optim.Optimizer
    ema: EMAModel
    scaler: torch.amp.GradScaler

    @classmethod
    def start(cls, config: GladConfig, device: torch.device) -> _Optimisation:
        cfg = config.training
        unet = build_unet(config).to(device).train()
        optimizer = torch.optim.AdamW(
            unet.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay)
        ema.to(device)
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
        return cls(unet, optimizer, ema, scaler)

    def step(self, loss: torch.Tensor, learning_rate: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.ema.step(self.unet.parameters())

    def save(self, folder: Path, step: int, config: GladConfig, seconds: float) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {f"model.{k}": v for k, v in self.unet.state_dict().items()}
        tensors |= {f"ema.{i}": p for i, p in enumerate(self.ema.shadow_params)}
        opt = self.optimizer.state_dict()
        for index, state in opt["state"].items():
            tensors |= {f"optim.{index}.{k}": v for k, v in state.items()}
        save_weights(folder / "state.safetensors", tensors)
        meta = {
            "step": step,
            "seconds": seconds,
            "config": config.model_dump(mode="json"),
            "param_groups": opt["param_groups"],
            "ema_optimization_step": self.ema.optimization_step,
            "scaler": self.scaler.state_dict(),
        }
        write_json(folder / "state.json", meta)

    def load(self, folder: Path, config: GladConfig) -> tuple[int, float]:
        """Resume: the step reached and the seconds spent so far."""
        meta = json.loads((folder / "state.json").read_text())
        if _resumable(GladConfig.model_validate(meta["config"])) != _resumable(config):
            raise ValueError(f"cannot resume from {folder}: it was trained with another config")
        tensors = load_file(str(folder / "state.safetensors"))
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        self.unet.load_state_dict(model)
        for i, p in enumerate(self.ema.shadow_params):
            p.copy_(tensors[f"ema.{i}"])
        self.ema.optimization_step = meta["ema_optimization_step"]
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])
        return int(meta["step"]), float(meta["seconds"])

    def served_unet(self) -> UNet2DModel:
        """A copy of the UNet holding the EMA weights, which are what gets served."""
        averaged = copy.deepcopy(self.unet)
        self.ema.copy_to(averaged.parameters())
        return averaged.eval()


def _resumable(config: GladConfig) -> dict[str, Any]:
    """What must match to resume: everything but how long to train and how often to save."""
    data = config.model_dump()
    for key in ("steps", "checkpoint_every"):
        del data["training"][key]
    return data


def _split(config: GladConfig, data: Path) -> tuple[list[Path], list[Path]]:
    """The images to train on and the held-out ones that calibrate."""
    every = config.training.holdout_every
    paths = training_images(data)
    train_paths, held_paths = split_holdout(paths, every)
    if len(held_paths) < 2:
        raise ValueError(
            f"{len(paths)} images in {data}: need at least {2 * every} so that two "
            f"(every {every}th) can be held out to calibrate the threshold"
        )
    return train_paths, held_paths


def _extra_good(folder: Path | None) -> list[Path]:
    if folder is None:
        return []
    if not folder.is_dir():
        raise FileNotFoundError(f"--extra-good {folder}: no such folder")
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"--extra-good {folder}: no images in it")
    return paths


def _fit(
    config: GladConfig,
    space: Space,
    images: torch.Tensor,
    device: torch.device,
    state_dir: Path,
    resume: bool,
    progress: bool,
) -> tuple[_Optimisation, float, float]:
    """ATP training, saving its state to state_dir as it goes: the optimisation, its final
    loss and the seconds it took (those of the interrupted run included, with `resume`)."""
    cfg = config.training
    alphas = build_noise_schedule(config.diffusion).alphas_cumprod
    textures = TextureSource.from_config(config.synthesis, config.image_size)
    run = _Optimisation.start(config, device)
    start, seconds = run.load(state_dir, config) if resume else (0, 0.0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress)
    loss_value = float("nan")
    began = time.perf_counter() - seconds
    for step in bar:
        generator = _step_generator(cfg.seed, step)
        index = torch.randint(0, len(images), (cfg.batch_size,), generator=generator)
        normal = from_uint8(images[index].to(device))
        if cfg.horizontal_flip:
            flip = torch.rand(cfg.batch_size, generator=generator) < 0.5
            normal[flip.to(device)] = normal[flip.to(device)].flip(-1)
        anomalous, _ = synthesize_anomalies(normal, config.synthesis, generator, textures)
        loss = atp_loss(run.unet, space, alphas, normal, anomalous, generator)
        run.step(loss, cfg.learning_rate * min(1.0, (step + 1) / max(1, cfg.warmup_steps)))
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.4f}")
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
            run.save(state_dir, step + 1, config, time.perf_counter() - began)
    return run, loss_value, time.perf_counter() - began


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
    extra_good: Path | None = None,
) -> TrainResult:
    """Train on a product's good images, build its memory of normal patches from the same
    images, calibrate on held-out ones, write the model folder. `extra_good` is a folder of
    more good images (an operator's false alarms): trained on and kept in the memory, never
    held out, so the threshold is still fitted on images of the product's own data.

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
    train_paths, held_paths = _split(config, data)
    extra_paths = _extra_good(extra_good)
    train_paths = train_paths + extra_paths
    torch.manual_seed(cfg.seed)
    dev = torch.device(device)
    images = load_uint8(train_paths, config.image_size)
    held = load_uint8(held_paths, config.image_size)
    # One space and one extractor, from the statistics to the calibration.
    space = build_space(config, build_feature_extractor(config.features)).to(dev)
    statistics = None
    if isinstance(space, FeatureSpace):
        statistics = feature_statistics(space, images, cfg.batch_size)
        space.set_statistics(statistics)
    resume_dir = out / RESUME_DIR
    run, loss_value, seconds = _fit(config, space, images, dev, resume_dir, resume, progress)
    served = run.served_unet()
    pipeline = compact_pipeline(config, served, dev, space=space)
    memory, memory_summary = None, {}
    if config.memory is not None:
        # From the images trained on, never the held-out ones that calibrate.
        memory, memory_summary = build_memory_bank(
            pipeline.memory_patches, images, config.memory, cfg.batch_size, cfg.seed
        )
        pipeline = compact_pipeline(config, served, dev, space=space, memory=memory)
    calibration, references = calibrate(pipeline, held, cfg.batch_size)
    summary: dict[str, Any] = {
        "data": str(data),
        "num_train_images": len(train_paths),
        "num_holdout_images": len(held_paths),
        "train_files": [p.name for p in train_paths],
        "holdout_files": [p.name for p in held_paths],
        "extra_good": str(extra_good) if extra_good else None,
        "num_extra_good_images": len(extra_paths),
        "steps": cfg.steps,
        "seconds": round(seconds, 2),
        "final_loss": loss_value,
        "device": str(dev),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **memory_summary,
    }
    weights = with_space_statistics(served.state_dict(), statistics)
    patches = memory.patches if memory is not None else None
    save_model_folder(out, config, weights, calibration, references, summary, patches)
    if not keep_resume:
        shutil.rmtree(resume_dir)
    return TrainResult(out, cfg.steps, seconds, loss_value, calibration)
