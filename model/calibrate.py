"""Calibration: held-out normal training images in, a product's ADS delta, each map's
reference and constants, threshold and normalisation out; and the one place they are applied.

Never test data: the held-out images are every n-th good training image (sorted by name),
which training leaves out; an imported model, trained elsewhere, is calibrated on all its
good images.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from model.checkpoint import load_model_folder, rewrite_calibration
from model.config import (
    PRESETS,
    ADSConfig,
    Calibration,
    GladConfig,
    MapCalibration,
    ScoringConfig,
    SynthesisConfig,
)
from model.data import from_uint8, load_uint8, split_holdout, to_uint8, training_images
from model.memory_bank import build_memory_bank
from model.parts import folder_parts
from model.pipeline import GladPipeline
from model.scoring import MapScale, fuse_maps, image_scores
from model.synthesis import synthesize_anomalies

# Each map is rescaled so that its held-out normal pixels' 0.90 quantile goes to 0 and the
# 0.995 quantile to 1 (EfficientAD's quantiles, anomalib's efficient_ad): maps of any units
# meet on one scale, set by the normals' upper tail rather than by their outliers.
MAP_QUANTILES = (0.90, 0.995)
# Synthetic anomalies pasted on each held-out normal to decide the references, and their seed.
SYNTHETIC_PER_IMAGE = 4
SYNTHETIC_SEED = 0


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


def fit_threshold(maps: torch.Tensor, config: ScoringConfig) -> Calibration:
    """Threshold and normalisation from held-out normal images' fused maps (N, S, S), each
    already taken relative to references it did not shape (leave-one-out), so that the
    threshold is not biased low."""
    n = maps.shape[0]
    if n < 2:
        raise ValueError("calibration needs at least 2 held-out normal images")
    scores = image_scores(maps.float(), config).cpu().numpy()
    values = maps.float().cpu().numpy()
    mean, std = float(np.mean(scores)), float(np.std(scores, ddof=1))
    return Calibration(
        threshold=mean + config.threshold_sigmas * max(std, 1e-6),
        normal_mean=mean,
        normal_std=std,
        map_threshold=float(np.quantile(values, config.map_threshold_quantile)),
        map_mean=float(np.mean(values)),
        num_images=n,
    )


@torch.no_grad()
def component_maps(
    pipeline: GladPipeline, images: torch.Tensor, batch_size: int, ads: ADSConfig
) -> dict[str, torch.Tensor]:
    """Each map of uint8 images (N, 3, S, S) before fusion, (N, S, S) by name, on the CPU."""
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in images.split(batch_size):
        x = from_uint8(chunk).to(pipeline.device, pipeline.dtype)
        for name, maps in pipeline.component_maps(x, pipeline.reconstruct(x, ads)).items():
            parts.setdefault(name, []).append(maps.cpu())
    return {name: torch.cat(maps) for name, maps in parts.items()}


def synthetic_anomalies(
    images: torch.Tensor, config: SynthesisConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """SYNTHETIC_PER_IMAGE of ATP's synthetic anomalies on each uint8 image (N, 3, S, S),
    from its own shuffled patches, seeded: the images (k * N, 3, S, S), uint8, the k-th copy
    of image j at k * N + j, and their masks (k * N, S, S), bool."""
    probe = config.model_copy(update={"anomaly_probability": 1.0, "texture_dir": None})
    generator = torch.Generator().manual_seed(SYNTHETIC_SEED)
    pairs = [
        synthesize_anomalies(from_uint8(images), probe, generator)
        for _ in range(SYNTHETIC_PER_IMAGE)
    ]
    anomalous = torch.cat([to_uint8(image) for image, _ in pairs])
    return anomalous, torch.cat([mask[:, 0] > 0.5 for _, mask in pairs])


def separation(
    normal: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor, config: ScoringConfig
) -> float:
    """How well a map parts anomalous images (with their masks) from normal ones: image AUROC
    (by image score) plus pixel AUROC (every other pixel of every image)."""
    maps = torch.cat([normal, anomalous]).float()
    labels = np.r_[np.zeros(len(normal)), np.ones(len(anomalous))]
    truth = torch.cat([torch.zeros_like(normal, dtype=torch.bool), masks])
    image = roc_auc_score(labels, image_scores(maps, config).numpy())
    pixel = roc_auc_score(truth[:, ::2, ::2].numpy().ravel(), maps[:, ::2, ::2].numpy().ravel())
    return float(image + pixel)


def takes_reference(
    normal: torch.Tensor, anomalous: torch.Tensor, masks: torch.Tensor, config: ScoringConfig
) -> bool:
    """Whether one map separates synthetic anomalies from held-out normals better less its
    reference map than without; a tie takes it.

    normal: the held-out normals' maps (N, S, S); anomalous: the maps of synthetic_anomalies
    made from them (k * N, S, S), with their masks. Every map is taken less a reference of
    normals it was not made from, as a new part's would be.
    """
    n = len(normal)
    adjusted, reference = leave_one_out(normal)
    source = normal[torch.arange(len(anomalous)) % n]
    anomalous_adjusted = anomalous - (n * reference - source) / (n - 1)
    with_reference = separation(adjusted, anomalous_adjusted, masks, config)
    return with_reference >= separation(normal, anomalous, masks, config)


def decide_references(
    pipeline: GladPipeline,
    images: torch.Tensor,
    normal_maps: dict[str, torch.Tensor],
    batch_size: int,
    ads: ADSConfig,
) -> dict[str, bool]:
    """Whether each map takes its reference, from the held-out normals (uint8) and their maps:
    never where the config turns references off, else as synthetic anomalies pasted on the
    same normals separate best (takes_reference)."""
    config = pipeline.config
    if not config.scoring.reference_map:
        return {name: False for name in normal_maps}
    anomalous, masks = synthetic_anomalies(images, config.synthesis)
    maps = component_maps(pipeline, anomalous, batch_size, ads)
    return {
        name: takes_reference(normal, maps[name], masks, config.scoring)
        for name, normal in normal_maps.items()
    }


def fit_map_scale(
    maps: torch.Tensor, takes_reference: bool
) -> tuple[MapCalibration, torch.Tensor, torch.Tensor | None]:
    """One map's constants from the held-out normals' maps (N, S, S): each less the reference
    of the others where the map takes its reference, then MAP_QUANTILES of their pixels.

    Returns the constants, the normals' maps as the product sees them, and the reference map
    (None where it is not taken)."""
    adjusted, reference = leave_one_out(maps) if takes_reference else (maps, None)
    low, high = np.quantile(adjusted.float().numpy().ravel(), MAP_QUANTILES)
    # A span floor for a map that is flat on every normal pixel (nothing to scale by).
    scale = MapCalibration(
        reference=takes_reference, low=float(low), high=float(max(high, low + 1e-6))
    )
    return scale, adjusted, reference


def calibrate(
    pipeline: GladPipeline,
    images: torch.Tensor,
    batch_size: int,
    references: dict[str, bool] | None = None,
) -> tuple[Calibration, dict[str, torch.Tensor]]:
    """A product's ADS delta, references, map constants, threshold and normalisation.

    Args:
        pipeline: uncalibrated (its config's ADS settings, maps as they come), with the
            product's memory where its config fuses one.
        images: held-out normal images, uint8 (N, 3, S, S), N >= 2.
        batch_size: images per pipeline call.
        references: whether each map takes its reference map; None decides it
            (decide_references).

    Returns the calibration and the reference map (S, S) of each map that takes one.
    """
    if len(images) < 2:
        raise ValueError("calibration needs at least 2 held-out normal images")
    scoring = pipeline.config.scoring
    delta = calibrate_delta(pipeline, images, batch_size)
    ads = ads_in_force(pipeline.config.ads, delta)
    normal_maps = component_maps(pipeline, images, batch_size, ads)
    if references is None:
        references = decide_references(pipeline, images, normal_maps, batch_size, ads)
    scales: dict[str, MapCalibration] = {}
    reference_maps: dict[str, torch.Tensor] = {}
    adjusted: dict[str, torch.Tensor] = {}
    for name, maps in normal_maps.items():
        scales[name], adjusted[name], reference = fit_map_scale(maps, references[name])
        if reference is not None:
            reference_maps[name] = reference
    zeros = torch.zeros(normal_maps[scoring.maps[0]].shape[-2:])
    fused = fuse_maps(
        adjusted,
        {name: MapScale(zeros, scale.low, scale.high) for name, scale in scales.items()},
        scoring.fusion,
    )
    calibration = fit_threshold(fused, scoring)
    return calibration.model_copy(update={"ads_delta": delta, "maps": scales}), reference_maps


def recalibrate_folder(folder: Path, data: Path, device: str = "cpu") -> Calibration:
    """Calibrate a trained model folder afresh (`glad calibrate`) on the same held-out
    training images it was trained beside, and rewrite its calibration.

    A compact model trained before the memory of normal patches gets one here, from the
    images it was trained on, with the preset's map settings: no retraining."""
    loaded = load_model_folder(folder, calibrated=False)
    config, training = loaded.config, loaded.training
    if training.get("imported"):
        # Nothing was trained here: every good image calibrates an imported model.
        held_paths = training_images(data)
    else:
        train_paths, held_paths = split_holdout(
            training_images(data), config.training.holdout_every
        )
        if [p.name for p in held_paths] != training.get("holdout_files"):
            raise ValueError(
                f"the held-out images of {data} are not the ones {folder} was trained "
                "beside: calibrating on images it was trained on would set its threshold too low"
            )
    pipeline = folder_parts(folder, loaded, torch.device(device), None, "torch")
    upgrade = config.memory is None and not training.get("imported")
    memory, summary = None, None
    if upgrade:
        preset = PRESETS["compact"]
        config = config.with_overrides(
            memory=preset.memory.model_dump(),
            scoring={"maps": preset.scoring.maps, "fusion": preset.scoring.fusion},
        )
        images = load_uint8(train_paths, config.image_size)
        bank, summary = build_memory_bank(
            pipeline.memory_patches, images, config.memory, config.training.batch_size
        )
        memory = bank.patches
        pipeline = GladPipeline(
            config,
            pipeline.denoiser,
            pipeline.space,
            memory=bank,
            device=pipeline.device,
            dtype=pipeline.dtype,
        )
    images = load_uint8(held_paths, config.image_size)
    calibration, references = calibrate(pipeline, images, config.training.batch_size)
    rewrite_calibration(
        folder,
        calibration,
        references,
        config=config if upgrade else None,
        memory=memory,
        training_update=summary,
    )
    return calibration


def ads_in_force(ads: ADSConfig, delta: float | None) -> ADSConfig:
    """The ADS settings with a product's calibrated delta, where it has one."""
    return ads if delta is None else ads.model_copy(update={"delta": delta})


def map_scales(
    calibration: Calibration, references: dict[str, torch.Tensor], size: int
) -> dict[str, MapScale]:
    """Each map's reference and constants as fuse_maps takes them; a calibration from
    before the memory: the reconstruction's map less its reference, unscaled."""
    zeros = torch.zeros((size, size))
    if calibration.maps is None:
        return {"reconstruction": MapScale(references.get("reconstruction", zeros))}
    return {
        name: MapScale(references[name] if scale.reference else zeros, scale.low, scale.high)
        for name, scale in calibration.maps.items()
    }


def calibrated(
    pipeline: GladPipeline, calibration: Calibration, references: dict[str, torch.Tensor]
) -> GladPipeline:
    """The same parts with the product's delta, references and map constants in force."""
    placed = copy.copy(pipeline)
    placed.ads = ads_in_force(pipeline.config.ads, calibration.ads_delta)
    scales = map_scales(calibration, references, pipeline.config.image_size)
    placed.scales = {
        name: replace(scale, reference=scale.reference.to(pipeline.device, torch.float32))
        for name, scale in scales.items()
    }
    return placed


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
