"""Evaluation on an MVTec-layout test split (`glad eval`): metrics, report and montage."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.stats import spearmanr
from tqdm import tqdm

from model.calibrate import is_anomalous, normalise_map, normalise_score
from model.config import Calibration
from model.data import TestItem, load_mask, load_rgb, test_items, to_tensor, to_uint8
from model.inspector import Inspector
from model.metrics import image_metrics, pixel_metrics
from model.pipeline import PipelineOutput
from model.render import feature_pictures, montage, overlay
from model.report import ImageScore, curves_picture

MONTAGE_ROWS = 12


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]  # image_* always; pixel_* and aupro where masks exist
    mean_denoise_step: float
    ms_per_image: float
    num_images: int
    # What ADS said (see denoise_step_report); empty without it.
    denoise_steps: dict[str, float | None]
    images: list[ImageScore]
    threshold: float

    def report(self) -> dict[str, float | int | None]:
        return {
            **self.metrics,
            "mean_denoise_step": self.mean_denoise_step,
            **self.denoise_steps,
            "ms_per_image": self.ms_per_image,
            "num_images": self.num_images,
        }

    def curves(self) -> Image.Image:
        labels = np.array([r.label for r in self.images])
        scores = np.array([r.raw_score for r in self.images])
        return curves_picture(labels, scores, self.threshold)


def denoise_step_report(
    steps: np.ndarray, labels: np.ndarray, areas: np.ndarray | None
) -> dict[str, float | None]:
    """How much a part's denoise step says: the share of good and of defective parts that
    decided, the spread of the defective parts' steps, and on defective parts the Spearman rank
    correlation of step with defect area (None where the steps or the areas do not vary)."""
    bad = labels == 1
    report: dict[str, float | None] = {
        "decided_good": float(np.mean(steps[~bad] > 0)) if (~bad).any() else None,
        "decided_defective": float(np.mean(steps[bad] > 0)) if bad.any() else None,
        "step_p10_defective": float(np.percentile(steps[bad], 10)) if bad.any() else None,
        "step_p90_defective": float(np.percentile(steps[bad], 90)) if bad.any() else None,
        "step_area_spearman": None,
    }
    if areas is not None and bad.sum() > 2:
        step, area = steps[bad], areas[bad]
        if np.ptp(step) > 0 and np.ptp(area) > 0:
            report["step_area_spearman"] = float(spearmanr(step, area).statistic)
    return report


def _montage_picks(items: list[TestItem]) -> list[int]:
    """A few good and mostly defective samples, spread over the split."""
    good = [i for i, it in enumerate(items) if not it.label]
    bad = [i for i, it in enumerate(items) if it.label]
    n_good = min(len(good), MONTAGE_ROWS // 3)
    n_bad = min(len(bad), MONTAGE_ROWS - n_good)
    return sorted(_spread(good, n_good) + _spread(bad, n_bad))


def _spread(indices: list[int], count: int) -> list[int]:
    return [indices[int(k)] for k in np.linspace(0, len(indices) - 1, count)] if count else []


@dataclass
class _Scored:
    """What one pass over the test split gave."""

    scores: list[float]
    steps: list[int]
    maps: np.ndarray
    seconds: float
    rows: list[list[Image.Image]]
    captions: list[str]


def _score_split(
    inspector: Inspector, items: list[TestItem], batch_size: int, picks: set[int], progress: bool
) -> _Scored:
    """Every test image through the pipeline; montage rows for the picked ones."""
    size = inspector.config.image_size
    calibration = inspector.calibration
    assert calibration is not None  # evaluate checked it
    scored = _Scored([], [], np.zeros((len(items), size, size), np.float32), 0.0, [], [])
    batches = range(0, len(items), batch_size)
    for start in tqdm(batches, desc="eval", disable=not progress):
        chunk = items[start : start + batch_size]
        images = [load_rgb(it.path) for it in chunk]
        began = time.perf_counter()
        out = inspector.pipeline(to_tensor(images, size))
        scored.maps[start : start + len(chunk)] = out.maps.cpu().numpy()
        scored.seconds += time.perf_counter() - began
        scored.scores += out.scores.cpu().tolist()
        scored.steps += out.reconstruction.denoise_steps.cpu().tolist()
        for offset, item in enumerate(chunk):
            if start + offset in picks:
                row = _montage_row(inspector, calibration, item, images[offset], out, offset)
                scored.rows.append(row)
                scored.captions.append(_caption(item, calibration, float(out.scores[offset])))
    return scored


def evaluate(
    inspector: Inspector,
    data: Path,
    batch_size: int = 8,
    montage_path: Path | None = None,
    progress: bool = True,
) -> Evaluation:
    """Score every test image; image metrics always, pixel metrics when masks exist."""
    calibration = inspector.calibration
    if calibration is None:
        raise ValueError("evaluation needs a calibrated model: load a trained model folder")
    items = test_items(data)
    size = inspector.config.image_size
    picks = set(_montage_picks(items)) if montage_path else set()
    scored = _score_split(inspector, items, batch_size, picks, progress)
    labels = np.array([it.label for it in items])
    metrics = image_metrics(labels, np.array(scored.scores))
    areas = None
    if any(it.mask is not None for it in items if it.label):
        masks = np.stack([load_mask(it.mask, size) for it in items])
        metrics |= pixel_metrics(masks, scored.maps)
        areas = masks.reshape(len(items), -1).mean(1)
    if montage_path is not None and scored.rows:
        titles = ["input", *_shown_titles(inspector), "heatmap", "ground truth"]
        montage(scored.rows, titles, scored.captions).save(montage_path)
    test_root = data / "test"
    per_image = [
        ImageScore(
            file=str(item.path.relative_to(test_root)),
            defect=item.defect,
            label=item.label,
            raw_score=raw,
            score=normalise_score(calibration, raw),
            is_anomalous=is_anomalous(calibration, raw),
            denoise_step=int(step),
        )
        for item, raw, step in zip(items, scored.scores, scored.steps, strict=True)
    ]
    steps = np.array(scored.steps)
    return Evaluation(
        metrics=metrics,
        mean_denoise_step=float(np.mean(steps)),
        ms_per_image=1000 * scored.seconds / len(items),
        num_images=len(items),
        denoise_steps=denoise_step_report(steps, labels, areas)
        if inspector.config.ads.adaptive
        else {},
        images=per_image,
        threshold=calibration.threshold,
    )


def _shown_titles(inspector: Inspector) -> list[str]:
    if inspector.pipeline.space.decodable:
        return ["reconstruction"]
    return ["input features", "reconstructed features"]


def _caption(item: TestItem, calibration: Calibration, raw: float) -> str:
    verdict = "ANOMALOUS" if is_anomalous(calibration, raw) else "normal"
    score = normalise_score(calibration, raw)
    return f"{item.defect}/{item.path.name}: {verdict}, score {score:.2f} (raw {raw:.4f})"


def _montage_row(
    inspector: Inspector,
    calibration: Calibration,
    item: TestItem,
    image: Image.Image,
    out: PipelineOutput,
    offset: int,
) -> list[Image.Image]:
    """Input, reconstruction, heatmap overlay, ground truth.

    In feature space the reconstruction is a feature map: the input's and the reconstruction's
    features are both drawn (see render.feature_pictures).
    """
    size = inspector.config.image_size
    resized = image.resize((size, size))
    rec = out.reconstruction
    if rec.images is not None:
        shown = [Image.fromarray(to_uint8(rec.images[offset]).permute(1, 2, 0).cpu().numpy())]
    else:
        pair = (rec.input_latents[offset], rec.latents[offset])
        shown = list(feature_pictures(*(z.float().cpu().numpy() for z in pair), size))
    heat = normalise_map(calibration, out.maps[offset].cpu().numpy())
    truth = Image.fromarray(load_mask(item.mask, size).astype(np.uint8) * 255)
    return [resized, *shown, overlay(resized, heat), truth]
