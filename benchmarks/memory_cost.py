"""What the memory of normal patches costs at inference: Inspector.inspect with the fused map
against the reconstruction's map alone, on the same model, in alternating rounds.

    python -m benchmarks.memory_cost --model results/cpu128/models/magnetic_tile/atp
    python -m benchmarks.memory_cost      # a random-weight compact model at 256 px, full bank

Each round times one batch through each variant; a row gives the median ms per image of
each, their ratio, and the lookup alone (the memory's distances for the same batch). The
table goes to benchmarks/results/memory-cost-<cpu|gpu>.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from benchmarks.speed import random_compact_folder, timed
from benchmarks.tables import write_table
from model.config import PRESETS, GladConfig
from model.data import to_tensor
from model.inspector import Inspector


def reconstruction_only(inspector: Inspector) -> Inspector:
    """The same model answering with its reconstruction's map alone (the preset before the
    memory): the same parts, the memory left out."""
    pipeline = copy.copy(inspector.pipeline)
    pipeline.config = pipeline.config.with_overrides(scoring={"maps": ("reconstruction",)})
    pipeline.scales = {"reconstruction": inspector.pipeline.scales["reconstruction"]}
    pipeline.memory = None
    return Inspector(pipeline, inspector.calibration, inspector.version)


def measure(inspector: Inspector, batch: int, rounds: int) -> dict[str, Any]:
    """ms per image of the fused map and of the reconstruction's alone, alternating."""
    pipeline = inspector.pipeline
    if pipeline.memory is None:
        raise ValueError("this model has no memory of normal patches to measure")
    size = inspector.config.image_size
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(batch)
    ]
    plain = reconstruction_only(inspector)
    x = to_tensor(images, size).to(pipeline.device, pipeline.dtype)
    with torch.no_grad():
        vectors = pipeline.memory_patches(x)
    memory = pipeline.memory
    for variant in (inspector, plain):
        variant.inspect(images)  # warm-up
    fused, alone, lookup = [], [], []
    for _ in range(rounds):
        fused.append(timed(lambda: inspector.inspect(images), pipeline.device))
        alone.append(timed(lambda: plain.inspect(images), pipeline.device))
        lookup.append(timed(lambda: memory.distances(vectors), pipeline.device))
    fused_ms, alone_ms = (1000 * statistics.median(t) / batch for t in (fused, alone))
    return {
        "image_size": size,
        "batch": batch,
        "rounds": rounds,
        "fused_ms_per_image": fused_ms,
        "reconstruction_only_ms_per_image": alone_ms,
        "ratio": fused_ms / alone_ms,
        "lookup_ms_per_image": 1000 * statistics.median(lookup) / batch,
        "memory_patches": len(memory),
        "memory_channels": memory.channels,
        "memory_mib": round(memory.patches.numel() * memory.patches.element_size() / 2**20, 2),
        "device": str(pipeline.device),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
    }


def _random_model(folder: Path, size: int) -> Path:
    compact = PRESETS["compact"]
    config = GladConfig.model_validate({**compact.model_dump(), "image_size": size})
    return random_compact_folder(config, folder)


def _cell(value: Any) -> str:
    if not isinstance(value, float):
        return str(value)
    return f"{value:.3f}" if value < 10 else f"{value:.1f}"


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(v) for v in row.values()) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, nargs="*", help="trained compact model folders")
    parser.add_argument("--random-size", type=int, default=256, help="px without --model")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--table", type=Path, help="where the table goes, without suffix")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folders = args.model or [_random_model(Path(tmp) / "compact", args.random_size)]
        for folder in folders:
            inspector = Inspector.load(folder, args.device)
            row = {"model": folder.name if args.model else "random weights"}
            if args.model:
                row["model"] = f"{folder.parent.parent.name}/{folder.name}"
            rows.append({**row, **measure(inspector, args.batch, args.rounds)})
            print(_table(rows[-1:]), flush=True)
    kind = "gpu" if args.device.startswith("cuda") else "cpu"
    path = args.table or Path("benchmarks/results") / f"memory-cost-{kind}"
    write_table(path, {"rows": rows}, _table(rows))
    print("\n" + _table(rows))


if __name__ == "__main__":
    main()
