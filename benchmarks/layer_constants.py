"""Per-layer constants for the reconstruction's map (issue 26's direction): does rescaling
each score layer's distance by its own held-out normals help, against today's raw sum?

For each trained folder (`benchmarks.accuracy`'s models), one pass over its held-out normals
and its test split gives each score layer's reconstruction map and the memory's map; the
rows are rules over those same maps, each rescaled as calibration does (the held-out
normals' 0.90 quantile to 0, 0.995 to 1, less the leave-one-out reference where the
folder's calibration takes it):

    memory only            the memory's map
    reconstruction (sum)   today: the layers' raw distances summed
    reconstruction (per-layer)   each layer over its normals' quantile span, then the mean
    fused (sum)            today's preset: memory + max(reconstruction (sum) - 1, 0)
    fused (per-layer)      the same with reconstruction (per-layer)
    layer L only           one score layer's map

    python -m benchmarks.layer_constants --results results/cpu128

The table goes to benchmarks/results/layer-constants-<cpu|gpu>.json and .md.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from benchmarks.tables import write_table
from model.calibrate import MAP_QUANTILES, held_out_images, leave_one_out
from model.data import from_uint8, load_mask, load_rgb, test_items, to_tensor
from model.inspector import Inspector
from model.pipeline import GladPipeline
from model.scoring import anomaly_maps, image_scores, memory_map


def layer_and_memory_maps(pipeline: GladPipeline, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each score layer's reconstruction map ("L<layer>") and the memory's, (B, S, S)."""
    x = x.to(pipeline.device, pipeline.dtype)
    rec = pipeline.reconstruct(x, pipeline.ads)
    size = (x.shape[-2], x.shape[-1])
    scoring = pipeline.config.scoring
    described = pipeline.space.describe_input(rec.input_latents, rec.input_features)
    reconstructed = pipeline.space.describe(rec.latents)
    maps = {
        f"L{layer}": anomaly_maps(described, reconstructed, (layer,), size, scoring).cpu()
        for layer in pipeline.config.features.score_layers
    }
    assert pipeline.memory is not None
    distances = pipeline.memory.distances(pipeline.patch_vectors(rec.input_features))
    maps["memory"] = memory_map(distances, size, scoring).cpu()
    return maps


def _concatenated(batches: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}


def rescaled(
    normal: torch.Tensor, test: torch.Tensor, reference: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal (leave-one-out) and test maps less the reference where taken, then rescaled
    by the normals' MAP_QUANTILES, as model.calibrate does."""
    if reference:
        normal, mean = leave_one_out(normal)
        test = test - mean
    low, high = np.quantile(normal.numpy().ravel(), MAP_QUANTILES)
    return (normal - low) / (high - low), (test - low) / (high - low)


def per_layer(
    normal: dict[str, torch.Tensor], test: dict[str, torch.Tensor], layers: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each raw layer map over its own normals' quantile span, then the mean of the layers."""
    spans = {}
    for layer in layers:
        low, high = np.quantile(normal[layer].numpy().ravel(), MAP_QUANTILES)
        spans[layer] = (low, high - low)
    normal_mean, test_mean = (
        sum((maps[layer] - spans[layer][0]) / spans[layer][1] for layer in layers) / len(layers)
        for maps in (normal, test)
    )
    return normal_mean, test_mean


@torch.no_grad()
def category_rows(folder: Path, data: Path, device: str) -> list[dict]:
    inspector = Inspector.load(folder, device)
    pipeline, calibration = inspector.pipeline, inspector.calibration
    assert calibration is not None and calibration.maps is not None
    references = {name: scale.reference for name, scale in calibration.maps.items()}
    config = pipeline.config
    held = held_out_images(config, data)
    normal = _concatenated(
        [layer_and_memory_maps(pipeline, from_uint8(chunk)) for chunk in held.split(8)]
    )
    items = test_items(data)
    size = config.image_size
    test = _concatenated(
        [
            layer_and_memory_maps(
                pipeline, to_tensor([load_rgb(i.path) for i in items[s : s + 8]], size)
            )
            for s in range(0, len(items), 8)
        ]
    )
    labels = np.array([item.label for item in items])
    masks = np.stack([load_mask(i.mask, size) if i.mask else np.zeros((size, size)) for i in items])
    truth = masks[:, ::2, ::2].ravel() > 0.5

    layers = [name for name in normal if name.startswith("L")]
    take = references["reconstruction"]
    _, memory = rescaled(normal["memory"], test["memory"], references["memory"])
    _, summed = rescaled(sum(normal[n] for n in layers), sum(test[n] for n in layers), take)
    _, layered = rescaled(*per_layer(normal, test, layers), take)
    rules = {
        "memory only": memory,
        "reconstruction (sum)": summed,
        "reconstruction (per-layer)": layered,
        "fused (sum)": memory + (summed - 1).clamp(min=0),
        "fused (per-layer)": memory + (layered - 1).clamp(min=0),
    }
    rules |= {
        f"layer {name[1:]} only": rescaled(normal[name], test[name], take)[1] for name in layers
    }
    rows = []
    for rule, maps in rules.items():
        scores = image_scores(maps.float(), config.scoring).numpy()
        rows.append(
            {
                "category": data.name,
                "rule": rule,
                "image_auroc": float(roc_auc_score(labels, scores)),
                # Every other pixel of every test image, as calibrate's separation does.
                "pixel_auroc": float(roc_auc_score(truth, maps[:, ::2, ::2].numpy().ravel())),
                "references": " ".join(f"{n}{'+' if t else '-'}" for n, t in references.items()),
            }
        )
        print(_table(rows[-1:], header=len(rows) == 1), flush=True)
    return rows


def _table(rows: list[dict], header: bool = True) -> str:
    columns = ["category", "rule", "image_auroc", "pixel_auroc", "references"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)] if header else []
    for row in rows:
        cells = [f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=Path("results/cpu128"))
    parser.add_argument("--data-root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", help="default: every trained category")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table", type=Path, help="where the table goes, without suffix")
    args = parser.parse_args()
    models = args.results / "models"
    categories = args.categories or sorted(p.name for p in models.iterdir())
    rows: list[dict] = []
    for name in categories:
        rows += category_rows(models / name / "atp", args.data_root / name, args.device)
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    path = args.table or Path("benchmarks/results") / f"layer-constants-{kind}"
    write_table(path, {"rows": rows}, _table(rows))
    print("\n" + _table(rows))


if __name__ == "__main__":
    main()
