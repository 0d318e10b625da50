"""What the offline model commands do (their arguments are in model.cli)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from model.calibrate import recalibrate_folder
from model.config import PRESETS, GladConfig
from model.data import load_rgb
from model.demo import demo_config, write_demo_images, write_good_folder
from model.evaluate import evaluate
from model.export import export_model_folder
from model.importer import import_checkpoints
from model.inspector import Inspector
from model.render import overlay
from model.report import near_chance_warning, per_defect, write_scores_csv
from model.train import train, training_warnings


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def run_train(args: argparse.Namespace) -> int:
    config = PRESETS[args.preset]
    if args.config is not None:
        config = GladConfig.model_validate_json(args.config.read_text())
    training: dict[str, object] = {"seed": args.seed}
    if args.steps is not None:
        training["steps"] = args.steps
    if args.batch_size is not None:
        training["batch_size"] = args.batch_size
    sections: dict[str, dict[str, object]] = {"training": training}
    if args.texture_dir is not None:
        sections["synthesis"] = {"texture_dir": str(args.texture_dir)}
    config = config.with_overrides(**sections)
    if args.image_size is not None:
        config = config.model_validate({**config.model_dump(), "image_size": args.image_size})
    for warning in training_warnings(config):
        print(f"glad train: warning: {warning}", file=sys.stderr)
    result = train(
        config,
        args.data,
        args.out,
        _device(args.device),
        resume=args.resume,
        overwrite=args.force,
        keep_resume=args.keep_resume,
        extra_good=args.extra_good,
    )
    cal = result.calibration
    print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min "
        f"(final loss {result.final_loss:.4f}); threshold {cal.threshold:.4f} "
        f"from {cal.num_images} held-out images; model folder: {result.folder}"
    )
    return 0


def run_import(args: argparse.Namespace) -> int:
    base = PRESETS["paper"]
    if args.config is not None:
        base = GladConfig.model_validate_json(args.config.read_text())
    result = import_checkpoints(
        args.sd,
        args.unet,
        args.dino,
        args.data,
        args.out,
        base=base,
        image_size=args.image_size,
        copy=args.copy,
        prompt=args.prompt,
        device=_device(args.device),
        batch_size=args.batch_size,
        overwrite=args.force,
    )
    cal = result.calibration
    how = "copied into it" if result.copied else "referenced by path, with their SHA-256"
    print(
        f"imported into {result.folder} (weights {how}); threshold {cal.threshold:.4f} from "
        f"{result.num_images} good images"
        + (f", ADS delta {cal.ads_delta:.4f}" if cal.ads_delta is not None else "")
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    cal = recalibrate_folder(args.model, args.data, _device(args.device))
    print(
        f"{args.model}: threshold {cal.threshold:.4f} from {cal.num_images} held-out images"
        + (f", ADS delta {cal.ads_delta:.4f}" if cal.ads_delta is not None else "")
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    inspector = Inspector.load(args.model, device=_device(args.device))
    report = args.report or args.model / "eval.json"
    montage_path = args.montage or report.with_suffix(".png")
    scores_path = report.with_suffix(".csv")
    curves_path = report.with_name(f"{report.stem}_curves.png")
    # Before the evaluation, which takes minutes: a missing folder must not lose its results.
    for path in (montage_path, report):
        path.parent.mkdir(parents=True, exist_ok=True)
    result = evaluate(inspector, args.data, args.batch_size, montage_path)
    rows = result.report()
    width = max(len(k) for k in rows)
    print(f"{'metric':<{width}}  value")
    for key, value in rows.items():
        print(
            f"{key:<{width}}  {value:.4f}"
            if isinstance(value, float)
            else f"{key:<{width}}  {value}"
        )
    defects = per_defect(result.images)
    print(f"\n{'defect':<{width}}  count  judged right  mean score  image AUROC")
    for defect, row in defects.items():
        auroc = "-" if row["image_auroc"] is None else f"{row['image_auroc']:.4f}"
        print(
            f"{defect:<{width}}  {row['count']:>5}  {row['judged_right']:>12.2f}  "
            f"{row['mean_score']:>10.3f}  {auroc:>11}"
        )
    warning = near_chance_warning(result.metrics["image_auroc"])
    if warning:
        print(f"glad eval: warning: {warning}", file=sys.stderr)
    report.write_text(json.dumps({**rows, "per_defect": defects}, indent=2) + "\n")
    write_scores_csv(scores_path, result.images)
    result.curves().save(curves_path)
    print(f"\nreport: {report}\nper-image scores: {scores_path}")
    print(f"curves: {curves_path}\nmontage: {montage_path}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    inspector = Inspector.load(args.model, device=_device(args.device))
    image = load_rgb(args.image)
    result = inspector.inspect([image])[0]
    verdict = "ANOMALOUS" if result.is_anomalous else "normal"
    print(
        f"{args.image}: {verdict}  score {result.score:.3f} (threshold 0.5; raw "
        f"{result.raw_score:.4f})  denoise step {result.denoise_step}"
    )
    if args.output:
        overlay(image, result.heatmap).save(args.output)
        print(f"heatmap: {args.output}")
    return 0


def run_demo(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as scratch:
        data = write_good_folder(Path(scratch) / "good", 32)
        result = train(
            demo_config(args.steps),
            data,
            args.out,
            "cpu",
            progress=not args.quiet,
            overwrite=args.force,
        )
    good, defect = write_demo_images(args.images)
    print(
        f"demo model in {result.folder} ({result.seconds:.0f} s); try it with {good} and {defect}"
    )
    return 0


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}  # the names model.cli offers


def run_export(args: argparse.Namespace) -> int:
    dtypes = tuple(_DTYPES[name] for name in args.dtypes)
    for path in export_model_folder(args.model, dtypes, activate=args.activate):
        print(f"wrote {path}")
    if args.activate:
        print(f"{args.model} now runs on ONNX Runtime (config.json runtime.backend)")
    return 0
