"""What `glad eval` writes for a person: per-image scores, a per-defect table, and the ROC,
precision-recall and score-histogram plots of good against defective parts in one PNG."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from sklearn.metrics import precision_recall_curve, roc_auc_score, roc_curve

# Image AUROC below this is reported as near chance: the model hardly separates anything.
NEAR_CHANCE_AUROC = 0.6


@dataclass(frozen=True)
class ImageScore:
    file: str  # relative to the category's test/ folder
    defect: str  # "good" for normal parts
    label: int  # 1 = defective
    raw_score: float
    score: float  # normalised, 0.5 = threshold
    is_anomalous: bool
    denoise_step: int


def write_scores_csv(path: Path, rows: Sequence[ImageScore]) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(ImageScore.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)


def per_defect(rows: Sequence[ImageScore]) -> dict[str, dict[str, float | int | None]]:
    """For each defect type: its count, the share judged anomalous (for "good": judged
    normal), its mean normalised score and its image AUROC against all good parts."""
    good = [r.raw_score for r in rows if not r.label]
    table: dict[str, dict[str, float | int | None]] = {}
    for defect in sorted({r.defect for r in rows}):
        mine = [r for r in rows if r.defect == defect]
        right = [r.is_anomalous == bool(r.label) for r in mine]
        auroc = None
        if mine[0].label and good:
            scores = good + [r.raw_score for r in mine]
            auroc = float(roc_auc_score([0] * len(good) + [1] * len(mine), scores))
        table[defect] = {
            "count": len(mine),
            "judged_right": float(np.mean(right)),
            "mean_score": float(np.mean([r.score for r in mine])),
            "image_auroc": auroc,
        }
    return table


def near_chance_warning(image_auroc: float) -> str | None:
    if image_auroc >= NEAR_CHANCE_AUROC:
        return None
    return (
        f"image AUROC {image_auroc:.3f} is near chance (0.5): this model hardly tells defective "
        "parts from good ones. Train it longer (--steps), check that train/good holds only "
        "good parts, or try the other preset."
    )


PLOT = 320  # side of each plot, pixels
MARGIN = 36
GOOD_COLOUR, BAD_COLOUR, LINE_COLOUR = (46, 125, 50), (198, 40, 40), (21, 101, 192)


def _frame(draw: ImageDraw.ImageDraw, left: int, title: str, x_label: str, y_label: str) -> None:
    draw.rectangle((left + MARGIN, MARGIN, left + MARGIN + PLOT, MARGIN + PLOT), outline=0)
    draw.text((left + MARGIN, 8), title, fill=0)
    draw.text((left + MARGIN + PLOT // 2 - 20, MARGIN + PLOT + 6), x_label, fill=0)
    draw.text((left + 2, MARGIN + PLOT // 2), y_label, fill=0)


def _curve(draw: ImageDraw.ImageDraw, left: int, xs: np.ndarray, ys: np.ndarray) -> None:
    points = [
        (left + MARGIN + float(x) * PLOT, MARGIN + (1 - float(y)) * PLOT)
        for x, y in zip(xs, ys, strict=True)
    ]
    draw.line(points, fill=LINE_COLOUR, width=2)


def curves_picture(labels: np.ndarray, scores: np.ndarray, threshold: float) -> Image.Image:
    """ROC, precision-recall and the histogram of good and defective parts' raw scores, with
    the threshold marked, side by side."""
    width = 3 * (PLOT + 2 * MARGIN)
    picture = Image.new("RGB", (width, PLOT + 2 * MARGIN + 8), "white")
    draw = ImageDraw.Draw(picture)
    step = PLOT + 2 * MARGIN

    fpr, tpr, _ = roc_curve(labels, scores)
    _frame(draw, 0, f"ROC (AUROC {roc_auc_score(labels, scores):.3f})", "FPR", "TPR")
    _curve(draw, 0, fpr, tpr)
    precision, recall, _ = precision_recall_curve(labels, scores)
    _frame(draw, step, "precision-recall", "recall", "prec.")
    _curve(draw, step, recall, precision)

    left = 2 * step
    _frame(draw, left, "raw scores: good (green), defective (red)", "score", "count")
    low, high = float(min(scores.min(), threshold)), float(max(scores.max(), threshold))
    edges = np.linspace(low, high + 1e-12, 31)
    counts = [np.histogram(scores[labels == k], edges)[0] for k in (0, 1)]
    tallest = max(1, max(int(c.max()) for c in counts))
    bar = PLOT / 30
    for colour, count, shift in ((GOOD_COLOUR, counts[0], 0), (BAD_COLOUR, counts[1], bar / 2)):
        for i, n in enumerate(count):
            if n:
                x = left + MARGIN + i * bar + shift
                top = MARGIN + PLOT * (1 - n / tallest)
                draw.rectangle((x, top, x + bar / 2 - 1, MARGIN + PLOT), fill=colour)
    x = left + MARGIN + PLOT * (threshold - low) / max(high - low, 1e-12)
    draw.line((x, MARGIN, x, MARGIN + PLOT), fill=0, width=2)
    draw.text((x + 3, MARGIN + 2), "threshold", fill=0)
    return picture
