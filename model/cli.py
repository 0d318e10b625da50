"""`glad train`, `glad eval` and `glad predict`: the offline model commands."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from model.config import PRESETS, GladConfig
from model.data import load_rgb
from model.demo import demo_config, write_demo_images, write_good_folder
from model.evaluate import evaluate
from model.export import export_model_folder
from model.inspector import Inspector
from model.render import overlay
from model.train import recalibrate, train


def _device(name: str) -> str:
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return name


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


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
    result = train(config, args.data, args.out, _device(args.device), resume=args.resume)
    cal = result.calibration
    print(
        f"trained {result.steps} steps in {result.seconds / 60:.1f} min "
        f"(final loss {result.final_loss:.4f}); threshold {cal.threshold:.4f} "
        f"from {cal.num_images} held-out images; model folder: {result.folder}"
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    cal = recalibrate(args.model, args.data, _device(args.device))
    print(
        f"{args.model}: threshold {cal.threshold:.4f} from {cal.num_images} held-out images"
        + (f", ADS delta {cal.ads_delta:.4f}" if cal.ads_delta is not None else "")
    )
    return 0


def run_eval(args: argparse.Namespace) -> int:
    inspector = Inspector.load(args.model, device=_device(args.device))
    montage_path = args.montage or (
        args.report.with_suffix(".png") if args.report else args.model / "eval_montage.png"
    )
    # Before the evaluation, which takes minutes: a missing folder must not lose its results.
    for path in (montage_path, args.report):
        if path is not None:
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
    print(f"montage: {montage_path}")
    if args.report:
        args.report.write_text(json.dumps(rows, indent=2) + "\n")
        print(f"report: {args.report}")
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
        result = train(demo_config(args.steps), data, args.out, "cpu", progress=not args.quiet)
    good, defect = write_demo_images(args.images)
    print(
        f"demo model in {result.folder} ({result.seconds:.0f} s); try it with {good} and {defect}"
    )
    return 0


def _reporting_errors(handler: Callable[[argparse.Namespace], int]) -> Callable:
    """Bad input (a missing folder, a bad model, an invalid setting) exits 2 with one line."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except (ValueError, OSError) as error:
            print(f"glad {args.command}: error: {error}", file=sys.stderr)
            return 2

    return run


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


def run_export(args: argparse.Namespace) -> int:
    dtypes = tuple(_DTYPES[name] for name in args.dtypes)
    for path in export_model_folder(args.model, dtypes, activate=args.activate):
        print(f"wrote {path}")
    if args.activate:
        print(f"{args.model} now runs on ONNX Runtime (config.json runtime.backend)")
    return 0


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add train, eval and predict to the `glad` command."""
    p = subparsers.add_parser("train", help="train one product's model on its good images")
    p.add_argument("--data", type=Path, required=True, help="MVTec category or folder of images")
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/<product>")
    p.add_argument("--preset", choices=sorted(PRESETS), default="compact")
    p.add_argument("--config", type=Path, help="a full config JSON (e.g. a model's config.json)")
    p.add_argument("--steps", type=int, help="training steps (preset default if unset)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--image-size", type=int, help="square input size in pixels")
    p.add_argument("--texture-dir", type=Path, help="texture images for synthetic anomalies")
    p.add_argument("--device", default=_default_device(), help="cpu or cuda[:N]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from --out's last checkpoint")
    p.set_defaults(handler=_reporting_errors(run_train), command="train")

    p = subparsers.add_parser(
        "calibrate", help="recalibrate a trained model on its held-out good images"
    )
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--data", type=Path, required=True, help="the data it was trained on")
    p.add_argument("--device", default=_default_device())
    p.set_defaults(handler=_reporting_errors(run_calibrate), command="calibrate")

    p = subparsers.add_parser("eval", help="evaluate a model on an MVTec-layout test split")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--data", type=Path, required=True, help="MVTec category (uses test/)")
    p.add_argument("--report", type=Path, help="write the metrics as JSON here")
    p.add_argument("--montage", type=Path, help="montage PNG (default: next to the report)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default=_default_device())
    p.set_defaults(handler=_reporting_errors(run_eval), command="eval")

    p = subparsers.add_parser("predict", help="inspect one image and write its heatmap")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("image", type=Path)
    p.add_argument("-o", "--output", type=Path, help="heatmap overlay PNG")
    p.add_argument("--device", default=_default_device())
    p.set_defaults(handler=_reporting_errors(run_predict), command="predict")

    p = subparsers.add_parser("demo", help="train a small demo product on generated parts")
    p.add_argument("--out", type=Path, default=Path("models/demo"), help="model folder")
    p.add_argument("--images", type=Path, default=Path("demo_images"), help="sample images")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_reporting_errors(run_demo), command="demo")

    p = subparsers.add_parser("export", help="write a model's UNet and features as ONNX files")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["fp32", "fp16"])
    p.add_argument(
        "--activate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make ONNX Runtime the folder's backend (default: yes)",
    )
    p.set_defaults(handler=_reporting_errors(run_export), command="export")
