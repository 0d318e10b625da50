"""The Python API the service uses: a loaded product model that inspects batches of images."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DModel
from PIL import Image
from torch import nn

from model.checkpoint import (
    CheckpointError,
    check_weights_fit,
    load_model_folder,
    split_space_statistics,
)
from model.config import ADSConfig, Calibration, GladConfig, ScoringConfig
from model.data import to_tensor
from model.diffusion import (
    Space,
    UNetDenoiser,
    build_noise_schedule,
    build_space,
    build_unet,
)
from model.features import Features, build_feature_extractor
from model.ort import load_onnx_parts
from model.reconstruct import Denoiser, Reconstruction, reconstruct
from model.scoring import anomaly_maps, image_scores
from model.sd import imported_parts


@dataclass(frozen=True)
class InspectionResult:
    raw_score: float
    score: float  # normalised to [0, 1]; the threshold is 0.5
    is_anomalous: bool
    anomaly_map: np.ndarray  # float32 (S, S) at the model's image size, raw units
    heatmap: np.ndarray  # the same map normalised to [0, 1]; the pixel threshold is 0.5
    denoise_step: int  # the ADS step the sample decided at; 0 = it never did
    # uint8 (S, S, 3), only when asked and only where the space decodes to images
    reconstruction: np.ndarray | None


@dataclass(frozen=True)
class BatchOutput:
    scores: torch.Tensor  # (B,) float32
    maps: torch.Tensor  # (B, S, S) float32
    steps: torch.Tensor  # (B,) int64
    reconstructions: torch.Tensor | None  # (B, 3, S, S) in [-1, 1]; None in feature space
    peak_discrepancy: torch.Tensor  # (B,) float32, see model.reconstruct
    latents: torch.Tensor  # (B, C, h, w): the reconstructed samples, in the model's space
    input_latents: torch.Tensor  # (B, C, h, w): the inputs, in the model's space


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


class Inspector:
    """GLAD for one product: reconstruct with ADS + SAFF, then map and score.

    The parts are pluggable: any denoiser eps(z_t, t) and a space holding its frozen feature
    extractor, already placed on `device` in `dtype` (torch modules, or ONNX Runtime sessions
    wrapped alike).
    """

    def __init__(
        self,
        config: GladConfig,
        denoiser: Denoiser,
        space: Space,
        *,
        calibration: Calibration | None = None,
        reference_map: torch.Tensor | None = None,
        version: str = "untrained",
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        random_weights: bool = False,
    ) -> None:
        self.config = config
        self.denoiser = denoiser
        self.space = space
        self.device = torch.device(device)
        self.dtype = dtype or default_dtype(self.device)
        self.calibration = calibration
        size = (config.image_size, config.image_size)
        reference = reference_map if reference_map is not None else torch.zeros(size)
        self.reference_map = reference.to(self.device, torch.float32)
        self.version = version
        # True when some part was built without trained weights: for speed measurement only.
        self.random_weights = random_weights
        self.alphas_cumprod = build_noise_schedule(config.diffusion).alphas_cumprod

    @property
    def features(self) -> Features:
        """The frozen feature extractor, held by the space."""
        if self.space.features is None:
            raise RuntimeError("this Inspector's space holds no feature extractor")
        return self.space.features

    @features.setter
    def features(self, features: Features) -> None:
        self.space.features = features

    @classmethod
    def from_unet(
        cls,
        config: GladConfig,
        unet: UNet2DModel,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        space_statistics: dict[str, torch.Tensor] | None = None,
        **calibrated: Any,
    ) -> Inspector:
        """The compact model's Inspector: a trained UNet plus the config's space and features.

        space_statistics: feature space's per-channel mean and std (see feature_statistics).
        """
        dev = torch.device(device)
        dtype = dtype or default_dtype(dev)
        # nn.Module.to: diffusers' override warns on every dtype cast, though this UNet keeps
        # no modules in fp32.
        placed = nn.Module.to(UNetDenoiser(unet), dev, dtype).eval().requires_grad_(False)
        features = build_feature_extractor(config.features)
        space = build_space(config, features, space_statistics).to(dev, dtype)
        return cls(config, placed, space, device=dev, dtype=dtype, **calibrated)

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        backend: str | None = None,
        calibrated: bool = True,
    ) -> Inspector:
        """Load a checkpoint folder; raises CheckpointError naming what is wrong with it.

        backend: "torch" or "onnxruntime" (the files `glad export` wrote); None = the
        folder's own setting (config.runtime.backend). calibrated=False: without its
        calibration, to calibrate it afresh.
        """
        loaded = load_model_folder(Path(folder), calibrated)
        config = loaded.config
        backend = backend or config.runtime.backend
        if backend not in ("torch", "onnxruntime"):
            raise ValueError(f"backend {backend!r}: use torch or onnxruntime")
        calibrated: dict[str, Any] = {
            "calibration": loaded.calibration,
            "reference_map": loaded.reference_map,
            "version": loaded.version,
        }
        dev = torch.device(device)
        dtype = dtype or default_dtype(dev)
        if config.diffusion.space == "vae":
            if backend != "torch":
                raise CheckpointError(f"{folder}: the paper preset runs on torch only, no ONNX")
            denoiser, space = imported_parts(Path(folder), config, loaded.weights, dev, dtype)
            return cls(config, denoiser, space, device=dev, dtype=dtype, **calibrated)
        unet_weights, statistics = split_space_statistics(config, loaded.weights)
        if backend == "onnxruntime":
            denoiser, features = load_onnx_parts(
                Path(folder), loaded.training["weights_sha256"], config.features, dev, dtype
            )
            space = build_space(config, features, statistics).to(dev, dtype)
            return cls(config, denoiser, space, device=dev, dtype=dtype, **calibrated)
        unet = build_unet(config)
        check_weights_fit(unet, unet_weights)
        unet.load_state_dict(unet_weights)
        return cls.from_unet(config, unet, device, dtype, statistics, **calibrated)

    def ads_config(self) -> ADSConfig:
        """The config's ADS settings, with the product's calibrated delta where it has one."""
        delta = self.calibration.ads_delta if self.calibration else None
        ads = self.config.ads
        return ads if delta is None else ads.model_copy(update={"delta": delta})

    @torch.no_grad()
    def run(self, images: torch.Tensor, ads: ADSConfig | None = None) -> BatchOutput:
        """The whole method on a preprocessed batch (B, 3, S, S) in [-1, 1].

        `ads` overrides the ADS settings for this call (calibration probes with it).
        """
        x, rec = self.reconstruct(images, ads)
        maps = self.raw_maps(x, rec, self.config.scoring) - self.reference_map
        scores = image_scores(maps, self.config.scoring)
        return BatchOutput(
            scores,
            maps,
            rec.denoise_steps,
            rec.images,
            rec.peak_discrepancy,
            rec.latents,
            rec.input_latents,
        )

    @torch.no_grad()
    def reconstruct(
        self, images: torch.Tensor, ads: ADSConfig | None = None
    ) -> tuple[torch.Tensor, Reconstruction]:
        """The batch placed on the device, and its reconstruction."""
        x = images.to(self.device, self.dtype)
        rec = reconstruct(
            self.denoiser,
            self.space,
            self.alphas_cumprod,
            x,
            ads or self.ads_config(),
            self.config.features.ads_layer,
        )
        return x, rec

    @torch.no_grad()
    def raw_maps(
        self, x: torch.Tensor, rec: Reconstruction, scoring: ScoringConfig
    ) -> torch.Tensor:
        """Anomaly maps of a reconstructed batch under `scoring`, before the reference map."""
        pixel_difference = None
        if rec.images is not None and scoring.pixel_weight > 0:
            pixel_difference = (x.float() - rec.images.float()).abs().mean(1, keepdim=True)
        return anomaly_maps(
            self.space.describe_input(x, rec.input_latents),
            self.space.describe(rec.latents),
            self.config.features.score_layers,
            tuple(x.shape[-2:]),
            scoring,
            pixel_difference,
        )

    def inspect(
        self, images: Sequence[Image.Image], return_reconstruction: bool = False
    ) -> list[InspectionResult]:
        """Inspect a batch of PIL images of any mode and size."""
        if self.calibration is None:
            raise RuntimeError("this Inspector has no calibration; load a trained model folder")
        if not images:
            return []
        out = self.run(to_tensor(images, self.config.image_size))
        scores = out.scores.cpu().numpy()
        maps = out.maps.cpu().numpy()
        steps = out.steps.cpu().tolist()
        recs = None
        if return_reconstruction and out.reconstructions is not None:
            recs = ((out.reconstructions.float() + 1) * 127.5).round().clamp(0, 255)
            recs = recs.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return [
            InspectionResult(
                raw_score=float(scores[i]),
                score=self.calibration.normalise_score(float(scores[i])),
                is_anomalous=bool(scores[i] > self.calibration.threshold),
                anomaly_map=maps[i],
                heatmap=self.calibration.normalise_map(maps[i]),
                denoise_step=int(steps[i]),
                reconstruction=None if recs is None else recs[i],
            )
            for i in range(len(images))
        ]

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one batch so first requests do not pay for lazy initialisation."""
        size = self.config.image_size
        self.run(torch.zeros((batch_size, 3, size, size)))
