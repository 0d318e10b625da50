"""The Python API the service uses: a product's model loaded from its folder, PIL images in,
verdicts out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.calibrate import calibrated, is_anomalous, normalise_map, normalise_score
from model.checkpoint import load_model_folder
from model.config import Calibration, GladConfig
from model.data import to_tensor, to_uint8
from model.parts import folder_parts
from model.pipeline import GladPipeline


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


class Inspector:
    """GLAD for one product: a calibrated pipeline and what makes its answers verdicts."""

    def __init__(
        self,
        pipeline: GladPipeline,
        calibration: Calibration | None,
        version: str,
        random_weights: bool = False,
    ) -> None:
        """pipeline: with the calibration's delta and reference map in force
        (model.calibrate.calibrated); no calibration: the pipeline runs, inspect refuses."""
        self.pipeline = pipeline
        self.calibration = calibration
        self.version = version
        # True when some part was built without trained weights: for speed measurement only.
        self.random_weights = random_weights

    @property
    def config(self) -> GladConfig:
        return self.pipeline.config

    @property
    def memory_patches(self) -> int | None:
        """Patches in the product's memory of normal patches; None where it has none."""
        return len(self.pipeline.memory) if self.pipeline.memory is not None else None

    @classmethod
    def load(
        cls,
        folder: Path,
        device: str = "cpu",
        dtype: torch.dtype | None = None,
        backend: str | None = None,
    ) -> Inspector:
        """Load a checkpoint folder; raises CheckpointError naming what is wrong with it.

        backend: "torch" or "onnxruntime" (the files `glad export` wrote); None = the
        folder's own setting (config.runtime.backend).
        """
        loaded = load_model_folder(Path(folder))
        backend = backend or loaded.config.runtime.backend
        parts = folder_parts(Path(folder), loaded, torch.device(device), dtype, backend)
        assert loaded.calibration is not None  # load_model_folder read it
        pipeline = calibrated(parts, loaded.calibration, loaded.references)
        return cls(pipeline, loaded.calibration, loaded.version)

    def inspect(
        self, images: Sequence[Image.Image], return_reconstruction: bool = False
    ) -> list[InspectionResult]:
        """Inspect a batch of PIL images of any mode and size."""
        if self.calibration is None:
            raise RuntimeError("this Inspector has no calibration; load a trained model folder")
        if not images:
            return []
        out = self.pipeline(to_tensor(images, self.config.image_size))
        scores = out.scores.cpu().numpy()
        maps = out.maps.cpu().numpy()
        steps = out.reconstruction.denoise_steps.cpu().tolist()
        rec_images = out.reconstruction.images
        recs = None
        if return_reconstruction and rec_images is not None:
            recs = to_uint8(rec_images).permute(0, 2, 3, 1).cpu().numpy()
        cal = self.calibration
        return [
            InspectionResult(
                raw_score=float(scores[i]),
                score=normalise_score(cal, float(scores[i])),
                is_anomalous=is_anomalous(cal, float(scores[i])),
                anomaly_map=maps[i],
                heatmap=normalise_map(cal, maps[i]),
                denoise_step=int(steps[i]),
                reconstruction=None if recs is None else recs[i],
            )
            for i in range(len(images))
        ]

    def warm_up(self, batch_size: int = 1) -> None:
        """Run one batch so first requests do not pay for lazy initialisation."""
        self.pipeline.warm_up(batch_size)
