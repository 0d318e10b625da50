"""Calibration: held-out normal training images in, a product's ADS delta, reference map,
threshold and normalisation out; and the one place they are applied.

Never test data: the held-out images are every n-th good training image (sorted by name),
which training leaves out; an imported model, trained elsewhere, is calibrated on all its
good images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from model.checkpoint import load_model_folder, rewrite_calibration
from model.config import ADSConfig, Calibration, GladConfig, ScoringConfig
from model.data import from_uint8, load_uint8, split_holdout, training_images
from model.parts import folder_parts
from model.pipeline import GladPipeline
from model.scoring import image_scores


def held_out_paths(config: GladConfig, data: Path) -> list[Path]:
    """The held-out normal training images that calibrate a model trained here."""
    return split_holdout(training_images(data), config.training.holdout_every)[1]


def held_out_images(config: GladConfig, data: Path) -> torch.Tensor:
    """The same images, uint8 (N, 3, S, S)."""
    return load_uint8(held_out_paths(config, data), config.image_size)


def calibrate_delta(pipeline: GladPipeline, images: torch.Tensor, batch_size: int) -> float | None:
    """The product's ADS delta from held-out normal images (uint8), or None where the config
    fixes it: the margin times the largest discrepancy a normal part shows at a check."""
    ads, margin = pipeline.config.ads, pipeline.config.training.delta_margin
    if not ads.adaptive or margin is None:
        return None
    # A probe where nothing may decide shows how far normal parts drift at the checks.
    probe = ads.model_copy(update={"delta": float("inf")})
    peaks = [
        pipeline.reconstruct(from_uint8(chunk), probe).peak_discrepancy.cpu()
        for chunk in images.split(batch_size)
    ]
    return margin * float(torch.cat(peaks).max())


def leave_one_out(maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each of n >= 2 normal maps minus the mean of the others, and the mean of all."""
    n = maps.shape[0]
    reference = maps.mean(0)
    return maps - (n * reference - maps) / (n - 1), reference


def fit_threshold(maps: torch.Tensor, config: ScoringConfig) -> tuple[Calibration, torch.Tensor]:
    """Fit the reference map, threshold and normalisation on held-out normal images' maps.

    Returns the calibration and the reference map (zeros when the config turns it off). Each
    held-out image is scored against the reference of the *other* images (leave-one-out), so
    the threshold is not biased low by images that shaped the reference.
    """
    n = maps.shape[0]
    if n < 2:
        raise ValueError("calibration needs at least 2 held-out normal images")
    maps = maps.float()
    if config.reference_map:
        adjusted, reference = leave_one_out(maps)
    else:
        reference = torch.zeros_like(maps[0])
        adjusted = maps
    scores = image_scores(adjusted, config).cpu().numpy()
    values = adjusted.cpu().numpy()
    mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1))
    calibration = Calibration(
        threshold=mean + config.threshold_sigmas * max(std, 1e-6),
        normal_mean=mean,
        normal_std=std,
        map_threshold=float(np.quantile(values, config.map_threshold_quantile)),
        map_mean=float(np.mean(values)),
        num_images=n,
    )
    return calibration, reference.cpu()


def calibrate(
    pipeline: GladPipeline, images: torch.Tensor, batch_size: int
) -> tuple[Calibration, torch.Tensor]:
    """ADS delta, reference map, threshold and normalisation from held-out normal images.

    `pipeline` must be uncalibrated (its config's ADS settings, no reference map), so its
    maps are the raw ones.
    """
    delta = calibrate_delta(pipeline, images, batch_size)
    ads = ads_in_force(pipeline.config.ads, delta)
    maps = torch.cat(
        [pipeline(from_uint8(chunk), ads).maps.cpu() for chunk in images.split(batch_size)]
    )
    calibration, reference_map = fit_threshold(maps, pipeline.config.scoring)
    return calibration.model_copy(update={"ads_delta": delta}), reference_map


def recalibrate_folder(folder: Path, data: Path, device: str = "cpu") -> Calibration:
    """Calibrate a trained model folder afresh (`glad calibrate`) on the same held-out
    training images it was trained beside, and rewrite its calibration."""
    loaded = load_model_folder(folder, calibrated=False)
    config, training = loaded.config, loaded.training
    if training.get("imported"):
        # Nothing was trained here: every good image calibrates an imported model.
        held_paths = training_images(data)
    else:
        held_paths = held_out_paths(config, data)
        if [p.name for p in held_paths] != training.get("holdout_files"):
            raise ValueError(
                f"the held-out images of {data} are not the ones {folder} was trained "
                "beside: calibrating on images it was trained on would set its threshold too low"
            )
    pipeline = folder_parts(folder, loaded, torch.device(device), None, "torch")
    images = load_uint8(held_paths, config.image_size)
    calibration, reference_map = calibrate(pipeline, images, config.training.batch_size)
    rewrite_calibration(folder, calibration, reference_map)
    return calibration


def ads_in_force(ads: ADSConfig, delta: float | None) -> ADSConfig:
    """The ADS settings with a product's calibrated delta, where it has one."""
    return ads if delta is None else ads.model_copy(update={"delta": delta})


def calibrated(
    pipeline: GladPipeline, calibration: Calibration, reference_map: torch.Tensor | None
) -> GladPipeline:
    """The same parts with the product's delta and reference map in force."""
    return GladPipeline(
        pipeline.config,
        pipeline.denoiser,
        pipeline.space,
        ads=ads_in_force(pipeline.config.ads, calibration.ads_delta),
        reference_map=reference_map,
        device=pipeline.device,
        dtype=pipeline.dtype,
    )


def is_anomalous(calibration: Calibration, raw: float) -> bool:
    return raw > calibration.threshold


def normalise_score(calibration: Calibration, raw: float) -> float:
    """Map a raw score to [0, 1]: the normal mean goes to 0, the threshold to 0.5."""
    span = max(calibration.threshold - calibration.normal_mean, 1e-12)
    return float(min(max(0.5 + 0.5 * (raw - calibration.threshold) / span, 0.0), 1.0))


def normalise_map(calibration: Calibration, anomaly_map: np.ndarray) -> np.ndarray:
    """Map a raw anomaly map to [0, 1] for display: the map mean goes to 0, the pixel
    threshold to 0.5, and this map's peak to at most 1.

    Above the threshold the slope is eased to fit the peak: a defect lies far above the
    threshold, and so may the rest of a decided part's map, which at one slope would all be
    saturated alike and show no place.
    """
    span = max(calibration.map_threshold - calibration.map_mean, 1e-12)
    excess = anomaly_map - calibration.map_threshold
    above = max(float(excess.max(initial=0.0)), span)
    scaled = 0.5 + 0.5 * np.where(excess > 0, excess / above, excess / span)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)
