"""The offline model commands' arguments: `glad train`, `import`, `calibrate`, `eval`,
`predict`, `demo` and `export`.

Parsing them imports no PyTorch (`glad serve`, the API, never needs it): each command's
handler in model.commands is imported when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

from model.config import AUTHORS_PROMPT, PRESETS

DTYPES = ("fp16", "fp32")


def plain_error(error: Exception) -> str:
    """An error as one sentence a user can act on; a config's validation errors included."""
    if not isinstance(error, ValidationError):
        return str(error)
    parts = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        given = item.get("input")
        got = "" if isinstance(given, dict) or not where else f" (got {given!r})"
        parts.append(f"{where}: {message}{got}" if where else message)
    return "invalid setting: " + "; ".join(parts)


def run_command(args: argparse.Namespace) -> int:
    """Run a model command. Bad input (a missing folder, a bad model, an invalid setting)
    exits 2 with one line."""
    from model import commands

    handler = getattr(commands, f"run_{args.command}")
    try:
        return handler(args)
    except (ValueError, OSError) as error:
        print(f"glad {args.command}: error: {plain_error(error)}", file=sys.stderr)
        return 2


class _ShowDefaults(argparse.HelpFormatter):
    """Help that gives each option's default, where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False
        if not unset and action.default != argparse.SUPPRESS and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


def _preset_values(section: str, name: str) -> str:
    values = (f"{p} {getattr(getattr(c, section), name)}" for p, c in sorted(PRESETS.items()))
    return "the preset's: " + ", ".join(values)


def _command(
    subparsers: argparse._SubParsersAction, name: str, help: str
) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(name, help=help, description=help, formatter_class=_ShowDefaults)
    parser.set_defaults(handler=run_command, command=name)
    return parser


def _device(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="cpu, cuda[:N], or auto (CUDA if any)")


def add_model_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add the model commands to the `glad` command."""
    _add_train(subparsers)
    _add_import(subparsers)
    _add_model_readers(subparsers)
    _add_demo_and_export(subparsers)


def _add_train(subparsers: argparse._SubParsersAction) -> None:
    p = _command(subparsers, "train", "train one product's model on its good images")
    p.add_argument("--data", type=Path, required=True, help="MVTec category or folder of images")
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/<product>")
    p.add_argument("--preset", choices=sorted(PRESETS), default="compact", help="settings")
    p.add_argument("--config", type=Path, help="a full config JSON (e.g. a model's config.json)")
    p.add_argument(
        "--steps", type=int, help=f"training steps ({_preset_values('training', 'steps')})"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help=f"images per step ({_preset_values('training', 'batch_size')})",
    )
    sizes = ", ".join(f"{p} {c.image_size}" for p, c in sorted(PRESETS.items()))
    p.add_argument("--image-size", type=int, help=f"square input size (the preset's: {sizes})")
    p.add_argument("--texture-dir", type=Path, help="texture images for synthetic anomalies")
    p.add_argument(
        "--extra-good",
        type=Path,
        help="a folder of more good images to train on, never held out: an operator's false "
        "alarms, as `glad review export --label false_alarm` writes them",
    )
    _device(p)
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw")
    p.add_argument("--resume", action="store_true", help="continue --out's interrupted run")
    p.add_argument("--force", action="store_true", help="train afresh over an existing --out")
    p.add_argument(
        "--keep-resume",
        action="store_true",
        help="keep the resume state (optimizer, raw weights) in --out after training, to "
        "train on later with --resume; by default it is dropped, as nothing serves it",
    )


def _add_import(subparsers: argparse._SubParsersAction) -> None:
    p = _command(
        subparsers, "import", "a product's model folder from the authors' GLAD checkpoints"
    )
    p.add_argument(
        "--sd", type=Path, required=True, help="Stable Diffusion v1.x folder (diffusers)"
    )
    p.add_argument(
        "--unet",
        type=Path,
        help="the fine-tuned UNet: the authors' checkpoint-N/ folder, its weights file, or a "
        "diffusers UNet folder (default: the SD folder's unet/)",
    )
    p.add_argument("--dino", type=Path, required=True, help="dino_vitbase8_pretrain.pth")
    p.add_argument("--data", type=Path, required=True, help="the product's good images")
    p.add_argument("--out", type=Path, required=True, help="model folder, e.g. models/<product>")
    p.add_argument("--config", type=Path, help="a full paper-preset config JSON")
    paper_size = PRESETS["paper"].image_size
    p.add_argument("--image-size", type=int, help=f"square input size (default: {paper_size})")
    p.add_argument(
        "--copy",
        action="store_true",
        help="copy the weights into --out; by default they are referenced by path, and a "
        "model whose files changed is refused",
    )
    p.add_argument("--prompt", default=AUTHORS_PROMPT, help="the prompt it was fine-tuned with")
    p.add_argument("--batch-size", type=int, default=8, help="images per calibration batch")
    _device(p)
    p.add_argument("--force", action="store_true", help="import over an existing --out")


def _add_model_readers(subparsers: argparse._SubParsersAction) -> None:
    """calibrate, eval and predict: commands that take a trained model folder."""
    p = _command(subparsers, "calibrate", "recalibrate a trained model on its held-out images")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--data", type=Path, required=True, help="the data it was trained on")
    _device(p)

    p = _command(subparsers, "eval", "evaluate a model on an MVTec-layout test split")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--data", type=Path, required=True, help="MVTec category (uses test/)")
    p.add_argument(
        "--report",
        type=Path,
        help="the metrics as JSON, with the per-image scores (.csv) and the curves "
        "(_curves.png) beside it (default: MODEL/eval.json)",
    )
    p.add_argument("--montage", type=Path, help="montage PNG (default: the report's, .png)")
    p.add_argument("--batch-size", type=int, default=8, help="images per batch")
    _device(p)

    p = _command(subparsers, "predict", "inspect one image and write its heatmap")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("image", type=Path, help="the part's image")
    p.add_argument("-o", "--output", type=Path, help="heatmap overlay PNG")
    _device(p)


def _add_demo_and_export(subparsers: argparse._SubParsersAction) -> None:
    p = _command(subparsers, "demo", "train a small demo product on generated parts")
    p.add_argument("--out", type=Path, default=Path("models/demo"), help="model folder")
    p.add_argument("--images", type=Path, default=Path("demo_images"), help="sample images")
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--force", action="store_true", help="train afresh over an existing --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = _command(subparsers, "export", "write a model's UNet and features as ONNX files")
    p.add_argument("--model", type=Path, required=True, help="model folder")
    p.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES), help="precisions")
    p.add_argument(
        "--activate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="make ONNX Runtime the folder's backend",
    )
