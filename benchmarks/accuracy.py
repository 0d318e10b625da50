"""Accuracy on real data: GLAD per category, the paper's ablation, and a PatchCore-style peer.

Trains and evaluates every MVTec-layout category under a data root, then prints one table
and writes it as Markdown and JSON under benchmarks/results/ (model folders go under --results):

    python -m benchmarks.accuracy                       # the default preset, on the GPU if any
    python -m benchmarks.accuracy --image-size 128 --channels 96 192 --layers-per-block 1 \
        --steps 1500   # reduced settings for a CPU (about 13 min per model here)
    python -m benchmarks.accuracy ... --reuse   # re-evaluate the trained folders
    python -m benchmarks.accuracy ... --reuse --distance euclidean   # another map distance

Rows (each on the same test images; every row is calibrated on the held-out normals with its
own settings, as training would have):
    plain         model trained without ATP, fixed-step reconstruction (no ADS, no SAFF)
    +ATP          ATP-trained model, fixed-step reconstruction
    +ADS          model without ATP, adaptive steps, no SAFF
    +ADS+SAFF     model without ATP, adaptive steps with SAFF
    ATP+ADS       ATP model, adaptive steps, no SAFF
    ATP+ADS+SAFF  all three
    paper gate    all three, with the paper's rule for undecided parts (kept as their input)
    preset        the ATP model with the preset's own inference settings (what the product runs)

--atp-only leaves out the rows of the model trained without ATP (one model per category).
The table goes to benchmarks/results/accuracy-<cpu|gpu>.json and .md (--table to change).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model.checkpoint import TRAINING, load_model_folder
from model.config import PRESETS, GladConfig
from model.evaluate import evaluate
from model.inspector import Inspector
from model.train import calibrate_model, held_out_images, resolve_distance, train

METRICS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "aupro")


@dataclass(frozen=True)
class Variant:
    name: str
    atp: bool
    ads: dict[str, Any]


VARIANTS = (
    Variant("plain", atp=False, ads={"adaptive": False}),
    Variant("+ATP", atp=True, ads={"adaptive": False}),
    Variant("+ADS", atp=False, ads={"adaptive": True, "saff": False}),
    Variant("+ADS+SAFF", atp=False, ads={"adaptive": True, "saff": True}),
    Variant("ATP+ADS", atp=True, ads={"adaptive": True, "saff": False}),
    Variant("ATP+ADS+SAFF", atp=True, ads={"adaptive": True, "saff": True}),
    Variant("paper gate", atp=True, ads={"adaptive": True, "saff": True, "undecided": "input"}),
    Variant("preset", atp=True, ads={}),
)


def _config(args: argparse.Namespace) -> GladConfig:
    config = PRESETS[args.preset]
    sections: dict[str, dict[str, Any]] = {"training": {"seed": args.seed}}
    if args.steps:
        sections["training"]["steps"] = args.steps
    if args.batch_size:
        sections["training"]["batch_size"] = args.batch_size
    diffusion: dict[str, Any] = {}
    if args.channels:
        diffusion["block_out_channels"] = tuple(args.channels)
    if args.patch_size:
        diffusion["patch_size"] = args.patch_size
    if args.layers_per_block:
        diffusion["layers_per_block"] = args.layers_per_block
    if diffusion:
        sections["diffusion"] = diffusion
    if args.distance:
        sections["scoring"] = {"distance": args.distance}
    if args.start_step:
        sections["ads"] = {"start_step": args.start_step}
    config = config.with_overrides(**sections)
    if args.image_size:
        config = GladConfig.model_validate({**config.model_dump(), "image_size": args.image_size})
    return config


def _train(config: GladConfig, data: Path, out: Path, device: str, atp: bool, reuse: bool) -> float:
    """Train one model; with `reuse`, a finished folder trained with the same config is kept."""
    if not atp:
        config = config.with_overrides(synthesis={"anomaly_probability": 0.0})
    if reuse and (out / TRAINING).is_file():
        trained = load_model_folder(out)
        if _training_part(trained.config) == _training_part(config):
            print(f"reusing {out} (trained with the same settings)", flush=True)
            return float(trained.training["seconds"]) / 60
    began = time.perf_counter()
    train(config, data, out, device, progress=True)
    return (time.perf_counter() - began) / 60


def _training_part(config: GladConfig) -> dict[str, Any]:
    """What shapes the trained weights; ADS, scoring and runtime settings apply at inference."""
    data = config.model_dump()
    return {k: v for k, v in data.items() if k not in ("ads", "scoring", "runtime")}


def _evaluate(
    folder: Path, data: Path, config: GladConfig, variant: Variant, device: str
) -> dict[str, Any]:
    inspector = Inspector.load(folder, device)
    # The current preset's inference settings with the variant's, calibrated afresh on the
    # held-out normals as training would have: delta, reference map and threshold all depend
    # on them, and a reused folder is then evaluated as a new one would be.
    current = config.model_dump()
    inspector.config = inspector.config.with_overrides(
        ads={**current["ads"], **variant.ads}, scoring=current["scoring"]
    )
    inspector.calibration = None
    inspector.reference_map.zero_()
    held = held_out_images(inspector.config, data)
    batch = inspector.config.training.batch_size
    check = resolve_distance(inspector, held, batch)
    calibration, reference = calibrate_model(inspector, held, batch)
    inspector.calibration = calibration
    inspector.reference_map = reference.to(inspector.device)
    result = evaluate(inspector, data, progress=False)
    return {**result.report(), "distance": inspector.config.scoring.distance, "check": check}


def _peer(data: Path, image_size: int) -> dict[str, Any] | None:
    try:
        from benchmarks.patchcore import evaluate_patchcore
    except ImportError:
        return None
    return evaluate_patchcore(data, image_size=image_size)


def run_category(args: argparse.Namespace, data: Path, config: GladConfig) -> list[dict]:
    device = args.device
    runs = args.results / "models" / data.name
    wanted = [
        v
        for v in VARIANTS
        if (args.ablation or v.name == "preset") and (v.atp or not args.atp_only)
    ]
    minutes = {
        atp: _train(config, data, runs / ("atp" if atp else "plain"), device, atp, args.reuse)
        for atp in sorted({v.atp for v in wanted}, reverse=True)
    }
    rows = []
    for variant in wanted:
        folder = runs / ("atp" if variant.atp else "plain")
        report = _evaluate(folder, data, config, variant, device)
        rows.append(
            {
                "category": data.name,
                "model": variant.name,
                **report,
                "train_minutes": minutes[variant.atp],
                "device": device,
                **_settings(config),
            }
        )
        print(_table([rows[-1]], header=len(rows) == 1), flush=True)
    if args.peer:
        peer = _peer(data, config.image_size)
        if peer is not None:
            rows.append(
                {
                    "category": data.name,
                    "model": "PatchCore (peer)",
                    **peer,
                    "train_minutes": peer.get("fit_seconds", 0) / 60,
                    "device": "cpu",
                }
            )
            print(_table([rows[-1]], header=False), flush=True)
    return rows


def _settings(config: GladConfig) -> dict[str, Any]:
    """The settings a row was measured with, beside its figures."""
    return {
        "image_size": config.image_size,
        "train_steps": config.training.steps,
        "unet_channels": list(config.diffusion.block_out_channels),
        "layers_per_block": config.diffusion.layers_per_block,
        "start_step": config.ads.start_step,
        "num_steps": config.ads.num_steps,
        "t_min": config.ads.t_min,
        "neighbourhood": config.scoring.neighbourhood,
    }


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "-" if value is None else str(value)


def _table(rows: list[dict], header: bool = True) -> str:
    columns = [
        "category",
        "model",
        *METRICS,
        "distance",
        "decided_good",
        "decided_defective",
        "step_area_spearman",
        "train_minutes",
        "ms_per_image",
        "device",
    ]
    lines = []
    if header:
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=Path("../shared/datasets"))
    parser.add_argument("--categories", nargs="*", help="default: every category folder")
    parser.add_argument("--results", type=Path, default=Path("results/accuracy"))
    parser.add_argument("--preset", choices=sorted(PRESETS), default="compact")
    parser.add_argument("--image-size", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--patch-size", type=int, help="pixels folded into channels per axis")
    parser.add_argument("--channels", type=int, nargs="+", help="UNet block_out_channels")
    parser.add_argument("--layers-per-block", type=int, help="UNet resnet blocks per level")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--distance", choices=["cosine", "euclidean", "auto"], help="map distance")
    parser.add_argument("--start-step", type=int, help="t the reconstruction starts from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument(
        "--atp-only", action="store_true", help="no model without ATP: its rows are left out"
    )
    parser.add_argument(
        "--table", type=Path, help="where the table goes, without suffix (default: see above)"
    )
    parser.add_argument(
        "--reuse",
        action="store_true",
        help="keep model folders under --results trained with the same settings (re-evaluate)",
    )
    args = parser.parse_args()

    config = _config(args)
    categories = args.categories or sorted(
        p.name for p in args.data_root.iterdir() if (p / "train").is_dir()
    )
    print(f"config: {config.model_dump_json()}", flush=True)
    rows: list[dict] = []
    for name in categories:
        rows += run_category(args, args.data_root / name, config)
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    table_path = args.table or Path("benchmarks/results") / f"accuracy-{kind}"
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table_path.with_suffix(".json").write_text(
        json.dumps({"config": config.model_dump(mode="json"), "rows": rows}, indent=2) + "\n"
    )
    table = _table(rows)
    table_path.with_suffix(".md").write_text(table + "\n")
    print("\n" + table)


if __name__ == "__main__":
    main()
