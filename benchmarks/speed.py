"""Speed of GLAD: the paper's recipe and the service's compact preset, side by side.

For each preset x batch x dtype x backend: images/s and p50/p99 batch latency through
Inspector.inspect, FLOPs per image (counted once per preset over one full inspect of one
image), achieved TFLOP/s beside the device's measured matmul peak in that dtype, and the
UNet alone against its FLOP floor (its FLOPs at that peak). One run prints one table.

    python -m benchmarks.speed                   # CPU defaults: compact at 64 px, batch 1
                                                 #   and 8, fp32, eager and onnx
    python -m benchmarks.speed --device cuda     # the full grid on a GPU

Both presets run at random weights with ADS in its worst case (no sample ever decides, so
every step is checked, and every image costs the same), unless --model names a trained
compact folder, whose own settings then apply. The paper preset has no ONNX export.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.tables import write_table
from model.checkpoint import load_model_folder, save_model_folder, with_space_statistics
from model.config import PRESETS, Calibration, GladConfig, MapCalibration
from model.diffusion import build_unet
from model.export import export_model_folder
from model.inspector import Inspector
from model.paper import RandomWeightsWarning, paper_inspector
from model.pipeline import GladPipeline

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# Defaults per device: the whole grid on a GPU; on a CPU what runs in minutes (the compact
# preset at 64 px: at 256 px one image takes minutes there, and the paper's takes hours).
CPU_GRID = {"presets": ["compact"], "batches": [1, 8], "dtypes": ["fp32"]}
CPU_GRID |= {"backends": ["eager", "onnx"], "compact_size": 64, "repeats": 5}
GPU_GRID = {"presets": ["compact", "paper"], "batches": [1, 8, 32], "dtypes": ["fp32", "fp16"]}
GPU_GRID |= {"backends": ["eager", "compile", "onnx"], "compact_size": 256, "repeats": 20}
# A delta no discrepancy reaches: every step is checked, the most an image can cost.
WORST_CASE_DELTA = 1e9
# A stand-in so inspect() runs on untrained models; their scores are not looked at.
PLACEHOLDER_CALIBRATION = Calibration(
    threshold=1.0, normal_mean=0.0, normal_std=1.0, map_threshold=1.0, map_mean=0.0, num_images=2
)


@dataclass
class Row:
    preset: str
    size: int
    batch: int
    dtype: str
    backend: str
    images_per_s: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    gflop_per_image: float | None = None
    tflops: float | None = None
    peak_percent: float | None = None
    unet_x_floor: float | None = None
    note: str = ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call, the device's queued work included."""
    _sync(device)
    began = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - began


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """The device's matrix peak in TFLOP/s, measured: the best of timed large matmuls."""
    n = 8192 if device.type == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    best = min(timed(lambda: a @ b, device) for _ in range(10))
    return 2 * n**3 / best / 1e12


def _sdpa_cpu_flops(
    query_shape: tuple[int, ...], key_shape: tuple[int, ...], value_shape: tuple[int, ...], *_, **__
) -> int:
    # torch's flop counter knows the GPU attention kernels but not the CPU one.
    b, h, lq, d = query_shape
    return 2 * b * h * lq * key_shape[-2] * (d + value_shape[-1])


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, every matmul, convolution and attention counted."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    # The fused attention fast path is one opaque kernel to the counter; the plain path is not.
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
            fn()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops()


def _worst_case(config: GladConfig) -> GladConfig:
    return config.with_overrides(ads={"delta": WORST_CASE_DELTA})


def random_compact_folder(config: GladConfig, folder: Path) -> Path:
    """A compact model folder at random weights (and worst-case ADS), loadable as a product."""
    config = _worst_case(config)
    unet = build_unet(config)
    space_stats = None
    if config.diffusion.space == "features":
        channels = config.sample_channels
        space_stats = {"mean": torch.zeros(channels), "std": torch.ones(channels)}
    weights = with_space_statistics(unet.state_dict(), space_stats)
    memory = None
    if config.memory is not None:
        # A full memory (max_patches), as a product with many training images holds.
        layers = config.features.score_layers
        channels = sum(config.features.layer_shape(layer)[0] for layer in layers)
        memory = torch.randn(config.memory.max_patches, channels)
    unit = MapCalibration(reference=False, low=0.0, high=1.0)
    calibration = PLACEHOLDER_CALIBRATION.model_copy(
        update={"maps": dict.fromkeys(config.scoring.maps, unit)}
    )
    note = {"note": "random weights, for speed measurement only"}
    save_model_folder(folder, config, weights, calibration, {}, note, memory)
    return folder


class Builder:
    """Inspectors for each configuration; ONNX files are exported once per dtype."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.device = torch.device(args.device)
        compact = GladConfig.model_validate(
            {**PRESETS["compact"].model_dump(), "image_size": args.compact_size}
        )
        self.folder = workdir / "compact"
        if args.model:
            # A copy: the ONNX files written for the onnx backend stay out of the user's folder.
            shutil.copytree(args.model, self.folder)
        else:
            random_compact_folder(compact, self.folder)
        self.compact_size = load_model_folder(self.folder).config.image_size
        self.exported: set[torch.dtype] = set()
        self.paper_config = _worst_case(
            GladConfig.model_validate(
                {**PRESETS["paper"].model_dump(), "image_size": args.paper_size}
            )
        )

    def __call__(self, preset: str, backend: str, dtype: torch.dtype) -> Inspector:
        if preset == "paper":
            if backend == "onnx":
                raise NotImplementedError("no ONNX export of the paper preset")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RandomWeightsWarning)
                inspector = paper_inspector(
                    config=self.paper_config,
                    device=self.device,
                    dtype=dtype,
                    calibration=PLACEHOLDER_CALIBRATION,
                )
        elif backend == "onnx":
            if dtype not in self.exported:
                export_model_folder(self.folder, (dtype,), activate=False)
                self.exported.add(dtype)
            inspector = Inspector.load(self.folder, self.args.device, dtype, "onnxruntime")
        else:
            inspector = Inspector.load(self.folder, self.args.device, dtype, "torch")
        if backend == "compile":
            # CUDA graphs on a GPU ("reduce-overhead"): the sampler's many small launches.
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
            parts = inspector.pipeline
            parts.denoiser = torch.compile(parts.denoiser, mode=mode)
            parts.features = torch.compile(parts.features, mode=mode)
        return inspector


def _images(count: int, size: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)
    ]


def _unet_seconds(pipeline: GladPipeline, batch: int, repeats: int) -> float:
    size = pipeline.config.image_size // pipeline.space.fold
    z = torch.randn(batch, pipeline.space.channels, size, size, device=pipeline.device)
    z = z.to(pipeline.dtype)
    t = torch.full((batch,), 500, device=pipeline.device, dtype=torch.long)
    with torch.no_grad():
        pipeline.denoiser(z, t)
        return statistics.median(
            timed(lambda: pipeline.denoiser(z, t), pipeline.device) for _ in range(repeats)
        )


def measure(inspector: Inspector, row: Row, args: argparse.Namespace) -> None:
    """Latency of repeated inspect() calls on one batch, bounded by --max-seconds."""
    images = _images(row.batch, row.size)
    for _ in range(args.warmup):
        inspector.inspect(images)
    latencies: list[float] = []
    began = time.perf_counter()
    while len(latencies) < args.repeats and time.perf_counter() - began < args.max_seconds:
        latencies.append(timed(lambda: inspector.inspect(images), inspector.pipeline.device))
    row.p50_ms = 1000 * float(np.percentile(latencies, 50))
    # At the median batch: on a shared machine one batch stalled by a neighbour would
    # otherwise decide the figure.
    row.images_per_s = row.batch / (row.p50_ms / 1000)
    row.p99_ms = 1000 * float(np.percentile(latencies, 99))
    row.note = f"{len(latencies)} batches"


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def table(rows: list[Row]) -> str:
    columns = list(Row.__dataclass_fields__)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(getattr(r, c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def ratios(rows: list[Row]) -> list[str]:
    """The targets' ratios, from the rows that measured both sides."""
    done = {(r.preset, r.batch, r.dtype, r.backend): r.images_per_s for r in rows if r.images_per_s}
    lines = []
    for (preset, batch, dtype, backend), speed in sorted(done.items()):
        paper = done.get(("paper", batch, dtype, backend))
        if preset == "compact" and paper:
            lines.append(f"compact / paper, batch {batch} {dtype} {backend}: {speed / paper:.0f}x")
        fp32 = done.get((preset, batch, "fp32", backend))
        if dtype == "fp16" and fp32:
            lines.append(f"fp16 / fp32, {preset} batch {batch} {backend}: {speed / fp32:.2f}x")
        eager = done.get((preset, batch, dtype, "eager"))
        if backend != "eager" and eager:
            lines.append(f"{backend} / eager, {preset} batch {batch} {dtype}: {speed / eager:.2f}x")
    return lines


def run(args: argparse.Namespace) -> list[Row]:
    device = torch.device(args.device)
    torch.set_num_threads(os.cpu_count() or 1)  # the same threads ONNX Runtime gets
    wanted = {*args.dtypes, *(args.paper_dtypes or ())}
    peaks = {d: matmul_peak(device, DTYPES[d]) for d in sorted(wanted)}
    for name, peak in peaks.items():
        print(f"matmul peak {name}: {peak:.3g} TFLOP/s")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        build = Builder(args, Path(tmp))
        for preset in args.presets:
            size = args.paper_size if preset == "paper" else build.compact_size
            dtypes, batches = args.dtypes, args.batches
            if preset == "paper":
                dtypes, batches = args.paper_dtypes or dtypes, args.paper_batches or batches
            flops = _count(build(preset, "eager", DTYPES[dtypes[0]]).pipeline)
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                for backend in args.backends:
                    try:
                        inspector = build(preset, backend, dtype)
                    except (NotImplementedError, RuntimeError) as error:
                        for batch in batches:
                            rows.append(
                                Row(preset, size, batch, dtype_name, backend, note=str(error))
                            )
                        continue
                    for batch in batches:
                        row = Row(preset, size, batch, dtype_name, backend)
                        measure(inspector, row, args)
                        per_image, unet_call = flops
                        row.gflop_per_image = per_image / 1e9
                        row.tflops = per_image * row.images_per_s / 1e12
                        row.peak_percent = 100 * row.tflops / peaks[dtype_name]
                        floor = unet_call * batch / (peaks[dtype_name] * 1e12)
                        row.unet_x_floor = _unet_seconds(inspector.pipeline, batch, 3) / floor
                        rows.append(row)
                        print(table([row]).splitlines()[-1], flush=True)
    return rows


def _count(pipeline: GladPipeline) -> tuple[int, int]:
    """FLOPs of one image's full run, and of one UNet call at batch 1 (CFG included)."""
    size = pipeline.config.image_size
    image = torch.zeros(1, 3, size, size)
    latent = size // pipeline.space.fold
    z = torch.zeros(1, pipeline.space.channels, latent, latent, device=pipeline.device)
    t = torch.full((1,), 500, device=pipeline.device, dtype=torch.long)
    with torch.no_grad():
        per_image = count_flops(lambda: pipeline(image))
        unet_call = count_flops(lambda: pipeline.denoiser(z.to(pipeline.dtype), t))
    return per_image, unet_call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--presets", nargs="+", choices=["compact", "paper"])
    parser.add_argument("--batches", nargs="+", type=int)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES))
    parser.add_argument("--backends", nargs="+", choices=["eager", "compile", "onnx"])
    parser.add_argument("--model", type=Path, help="a trained compact model folder")
    parser.add_argument("--compact-size", type=int, help="px of the random-weight compact model")
    parser.add_argument("--paper-size", type=int, default=512, help="px of the paper preset")
    # The paper preset costs seconds per image on a GPU: a smaller grid keeps one run short.
    parser.add_argument("--paper-batches", nargs="+", type=int, help="default: --batches")
    parser.add_argument(
        "--paper-dtypes", nargs="+", choices=sorted(DTYPES), help="default: --dtypes"
    )
    parser.add_argument("--repeats", type=int, help="timed batches per configuration")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=60.0, help="per configuration")
    parser.add_argument("--quick", action="store_true", help="batch 1 only, 2 timed batches")
    parser.add_argument("--table", type=Path, help="also write the table here (.json, .md)")
    args = parser.parse_args()
    grid = GPU_GRID if args.device.startswith("cuda") else CPU_GRID
    for key, default in grid.items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.quick:
        args.batches, args.repeats = [1], 2
    print(
        f"device {args.device}, torch {torch.__version__}, {os.cpu_count()} CPU threads; "
        f"ADS worst case (a check at every step) unless --model; inspect() end to end; "
        f"images/s at the median batch latency"
    )
    rows = run(args)
    print()
    print(table(rows))
    for line in ratios(rows):
        print(line)
    if args.table is not None:
        payload = {"rows": [asdict(row) for row in rows], "ratios": ratios(rows)}
        write_table(args.table, payload, "\n".join([table(rows), "", *ratios(rows)]))


if __name__ == "__main__":
    main()
