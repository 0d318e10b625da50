"""Accuracy on real data: GLAD per category, the paper's ablation, and a PatchCore-style peer.

Trains and evaluates every MVTec-layout category under a data root, then prints one table
and writes it as Markdown and JSON under benchmarks/results/ (model folders go under --results):

    python -m benchmarks.accuracy                       # the default preset, on the GPU if any
    python -m benchmarks.accuracy --image-size 128 --channels 96 192 --layers-per-block 1 \
        --steps 1500   # reduced settings for a CPU (about 13 min per model here)
    python -m benchmarks.accuracy ... --reuse   # re-evaluate the trained folders
    python -m benchmarks.accuracy ... --reuse --distance euclidean   # another map distance

Rows (each on the same test images; every row is calibrated on the held-out normals with its
own settings, as training would have; "decided": each map's reference as calibration decides
it from synthetic anomalies on the held-out normals):
    preset        what the product runs: the ATP model with ADS and SAFF, its reconstruction's
                  map and its memory's fused ("memory_plus_excess"), references decided
    fused mean    the same with the other fusion rule measured: the mean of the rescaled maps
    reconstruction only   the reconstruction's map alone, less its reference (the preset
                  before the memory)
    reconstruction, decided / no reference    the same, its reference decided / never taken
    memory only   the memory's map alone (the product's own PatchCore), reference decided
    memory, reference / no reference          the same, its reference always / never taken
    plain         model trained without ATP, fixed-step reconstruction (no ADS, no SAFF) from
                  where the preset restarts undecided parts (t_min)
    +ATP          ATP-trained model, the same fixed-step reconstruction
    +ADS          model without ATP, adaptive steps, no SAFF
    +ADS+SAFF     model without ATP, adaptive steps with SAFF
    ATP+ADS       ATP model, adaptive steps, no SAFF
    paper gate    all three, with the paper's rule for undecided parts (kept as their input)
    previous preset   the compact preset before ADS: fixed step from 400, single-position
                  features, whole-map search
The rows from plain on are GLAD's own ablation: the reconstruction's map alone, less its
reference, as they were measured before the memory.

--atp-only leaves out the rows of the model trained without ATP (one model per category).
The table goes to benchmarks/results/accuracy-<cpu|gpu>.json and .md (--table to change).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.tables import write_table
from model.calibrate import calibrate, calibrated, held_out_images, recalibrate_folder
from model.checkpoint import TRAINING, load_model_folder
from model.config import PRESETS, Calibration, GladConfig
from model.evaluate import evaluate
from model.inspector import Inspector
from model.pipeline import GladPipeline, ddim_timesteps
from model.train import train

METRICS = ("image_auroc", "image_ap", "image_f1", "pixel_auroc", "pixel_ap", "aupro")


@dataclass(frozen=True)
class Variant:
    name: str
    atp: bool
    ads: dict[str, Any]
    scoring: dict[str, Any] = field(default_factory=dict)
    # ADS off, reconstructing from where the preset restarts an undecided part (t_min): the
    # plain reconstruction every part would get without the step choice.
    fixed_step: bool = False
    # Whether each map takes its reference; None: as calibration decides.
    references: dict[str, bool] | None = None


_RECONSTRUCTION = {"maps": ("reconstruction",)}
_MEMORY = {"maps": ("memory",)}
# GLAD's own ablation rows: the reconstruction's map alone, less its reference, as measured
# before the memory of normal patches.
_GLAD = {"scoring": _RECONSTRUCTION, "references": {"reconstruction": True}}

VARIANTS = (
    Variant("preset", atp=True, ads={}),
    Variant("fused mean", atp=True, ads={}, scoring={"fusion": "mean"}),
    Variant("reconstruction only", atp=True, ads={}, **_GLAD),
    Variant("reconstruction, decided", atp=True, ads={}, scoring=_RECONSTRUCTION),
    Variant(
        "reconstruction, no reference",
        atp=True,
        ads={},
        scoring=_RECONSTRUCTION,
        references={"reconstruction": False},
    ),
    Variant("memory only", atp=True, ads={}, scoring=_MEMORY),
    Variant("memory, reference", atp=True, ads={}, scoring=_MEMORY, references={"memory": True}),
    Variant(
        "memory, no reference", atp=True, ads={}, scoring=_MEMORY, references={"memory": False}
    ),
    Variant("plain", atp=False, ads={}, fixed_step=True, **_GLAD),
    Variant("+ATP", atp=True, ads={}, fixed_step=True, **_GLAD),
    Variant("+ADS", atp=False, ads={"adaptive": True, "saff": False}, **_GLAD),
    Variant("+ADS+SAFF", atp=False, ads={"adaptive": True, "saff": True}, **_GLAD),
    Variant("ATP+ADS", atp=True, ads={"adaptive": True, "saff": False}, **_GLAD),
    Variant(
        "paper gate",
        atp=True,
        ads={"adaptive": True, "saff": True, "undecided": "input"},
        **_GLAD,
    ),
    # The compact preset before ADS, the neighbourhood and the window (format 1 folders).
    Variant(
        "previous preset",
        atp=True,
        ads={"adaptive": False, "start_step": 400, "num_steps": 10},
        scoring={**_RECONSTRUCTION, "neighbourhood": 1, "search_radius": None},
        references={"reconstruction": True},
    ),
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
            if trained.config.memory is None and config.memory is not None:
                # Trained before the memory of normal patches: `glad calibrate` adds it.
                recalibrate_folder(out, data, device)
            return float(trained.training["seconds"]) / 60
    began = time.perf_counter()
    train(config, data, out, device, progress=True, overwrite=True)
    return (time.perf_counter() - began) / 60


def _training_part(config: GladConfig) -> dict[str, Any]:
    """What shapes the trained weights; ADS, scoring, memory and runtime settings apply after."""
    data = config.model_dump()
    return {k: v for k, v in data.items() if k not in ("ads", "scoring", "memory", "runtime")}


def _evaluate(
    folder: Path, data: Path, config: GladConfig, variant: Variant, device: str
) -> dict[str, Any]:
    trained = Inspector.load(folder, device).pipeline
    # The current preset's inference settings with the variant's, calibrated afresh on the
    # held-out normals as training would have: delta, reference map and threshold all depend
    # on them, and a reused folder is then evaluated as a new one would be.
    current = config.model_dump()
    ads = {**current["ads"], **variant.ads}
    if variant.fixed_step:
        below = [t for t, _ in ddim_timesteps(config.ads.start_step, config.ads.num_steps)]
        below = [t for t in below if t <= config.ads.t_min]
        ads |= {"adaptive": False, "start_step": below[0], "num_steps": len(below)}
    own = trained.config.with_overrides(ads=ads, scoring={**current["scoring"], **variant.scoring})
    uncalibrated = GladPipeline(
        own,
        trained.denoiser,
        trained.space,
        memory=trained.memory,
        device=trained.device,
        dtype=trained.dtype,
    )
    held = held_out_images(own, data)
    calibration, references = calibrate(
        uncalibrated, held, own.training.batch_size, variant.references
    )
    pipeline = calibrated(uncalibrated, calibration, references)
    inspector = Inspector(pipeline, calibration, f"{folder.name}:{variant.name}")
    result = evaluate(inspector, data, progress=False)
    return {
        **result.report(),
        "distance": inspector.config.scoring.distance,
        **_settings(inspector.config),
        "references": _references(calibration),
        "memory_patches": len(trained.memory) if trained.memory is not None else None,
    }


def _references(calibration: Calibration) -> str:
    """Which maps took their reference, as "reconstruction+ memory-"."""
    assert calibration.maps is not None  # every row is calibrated afresh
    return " ".join(f"{name}{'+' if m.reference else '-'}" for name, m in calibration.maps.items())


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
        if not args.variants or v.name in args.variants
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
    """The settings a row was measured with (its own, after the variant's), beside its figures."""
    return {
        "image_size": config.image_size,
        "train_steps": config.training.steps,
        "unet_channels": list(config.diffusion.block_out_channels),
        "layers_per_block": config.diffusion.layers_per_block,
        "start_step": config.ads.start_step,
        "num_steps": config.ads.num_steps,
        "t_min": config.ads.t_min,
        "adaptive": config.ads.adaptive,
        "undecided": config.ads.undecided,
        "neighbourhood": config.scoring.neighbourhood,
        "search_radius": config.scoring.search_radius,
        "maps": list(config.scoring.maps),
        "fusion": config.scoring.fusion if len(config.scoring.maps) > 1 else None,
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
        "references",
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
    parser.add_argument("--distance", choices=["cosine", "euclidean"], help="map distance")
    parser.add_argument("--start-step", type=int, help="t the reconstruction starts from")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-ablation", dest="ablation", action="store_false")
    parser.add_argument("--no-peer", dest="peer", action="store_false")
    parser.add_argument(
        "--atp-only", action="store_true", help="no model without ATP: its rows are left out"
    )
    parser.add_argument(
        "--keep-others",
        action="store_true",
        help="keep the rows this run does not measure (category and model), from the last run",
    )
    parser.add_argument("--variants", nargs="+", help="only these rows (names as above)")
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
    if args.keep_others and table_path.with_suffix(".json").is_file():
        # Rows of an earlier run that this one did not measure stay; the others are replaced.
        earlier = json.loads(table_path.with_suffix(".json").read_text())["rows"]
        measured = {(r["category"], r["model"]) for r in rows}
        rows = [r for r in earlier if (r["category"], r["model"]) not in measured] + rows
        order = {v.name: i for i, v in enumerate(VARIANTS)}
        rows.sort(key=lambda r: (r["category"], order.get(r["model"], len(order))))
    table = _table(rows)
    write_table(table_path, {"config": config.model_dump(mode="json"), "rows": rows}, table)
    print("\n" + table)


if __name__ == "__main__":
    main()
