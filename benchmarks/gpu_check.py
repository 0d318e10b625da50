"""One command that proves the GPU path: the CUDA tests, the bare model's speed, the service
end to end and accuracy at 256 px, each part within its own time budget.

On a machine with a CUDA GPU, nothing prepared but the repository and the bundle that
`make gpu-bundle` writes (wheels, redis-server, one category's images):

    bash benchmarks/gpu_check.sh        # installs the bundle where it runs, then this

    python -m benchmarks.gpu_check --dry-run --out DIR   # every part on the CPU, tiny sizes

A part that fails or runs out of its budget is recorded as such, and the rest still run.
Writes three files to --out ($OUT where set): gpu-check.md (each part's status, then every
table, under the PyTorch and CUDA versions they ran on), gpu-check.json (the same), and
results.tar.gz (each table as benchmarks/results/ names it, and each part's log).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.tables import write_table

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
PRODUCT = "compact"
CATEGORY = "mvtec_transistor"
# Seconds per part on the GPU: 470 in all, inside the 8 minutes with the bundle's install.
BUDGETS = {"cuda-tests": 120, "speed": 130, "service": 120, "accuracy": 100}
# The CPU dry run is about proving that every part runs, not about time: the same for each.
DRY_BUDGET_S = 400


@dataclass
class Part:
    name: str
    budget_s: float
    commands: list[list[str]]
    tables: list[str]  # the stems the commands write their tables to, under the work folder


@dataclass
class Outcome:
    name: str
    status: str  # "ok", "failed (exit N)" or "ran out of its N s budget"
    seconds: float
    budget_s: float
    tables: list[str] = field(default_factory=list)


def environment(device: str) -> dict[str, str]:
    """What every table ran on."""
    cuda = torch.cuda.is_available() and device.startswith("cuda")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU ({os.cpu_count()} threads)",
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda) if cuda else "-",
        "python": platform.python_version(),
    }


def plan(args: argparse.Namespace, work: Path, models: Path, data: Path) -> list[Part]:
    """The four parts' commands: on the GPU at the default preset's size, dry at tiny ones."""
    dry = args.dry_run
    device = "cpu" if dry else "cuda"
    size = 64 if dry else 256

    def budget(name: str) -> float:
        return DRY_BUDGET_S if dry else args.budget.get(name, BUDGETS[name])

    tests = [PYTHON, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    tests += [f"--junitxml={work / 'cuda-tests.xml'}", "tests/test_cuda.py"]
    speed = [PYTHON, "-m", "benchmarks.speed", "--device", device, "--presets", "compact"]
    speed += ["--compact-size", str(size)]
    if dry:
        speed_runs = [[*speed, "--dtypes", "fp32", "--backends", "eager", "--quick"]]
        speed_runs[0] += ["--table", str(work / "speed-gpu-eager")]
        speed_stems = ["speed-gpu-eager"]
    else:
        grid = ["--batches", "1", "8", "32", "--repeats", "10", "--max-seconds", "8"]
        speed_runs = [
            [*speed, *grid, "--dtypes", "fp32", "fp16", "--backends", "eager"]
            + ["--table", str(work / "speed-gpu-eager")],
            [*speed, *grid, "--dtypes", "fp16", "--backends", "compile"]
            + ["--table", str(work / "speed-gpu-compiled")],
        ]
        speed_stems = ["speed-gpu-eager", "speed-gpu-compiled"]
    service = [PYTHON, "-m", "benchmarks.service_throughput", "--device", device]
    service += ["--models", str(models), "--product", PRODUCT, "--rounds", "1"]
    if dry:
        service += ["--batch", "4", "--seconds", "2", "--model-seconds", "1", "--size", "64"]
        full, half = 4, 2
    else:
        service += ["--batch", "32", "--seconds", "15", "--model-seconds", "5"]
        full, half = 64, 32
    accuracy = [PYTHON, "-m", "benchmarks.accuracy", "--device", device, "--data-root", str(data)]
    accuracy += ["--results", str(work / "accuracy-models"), "--table", str(work / "accuracy-gpu")]
    accuracy += ["--variants", "preset", "reconstruction only", "memory only"]
    if dry:
        accuracy += ["--image-size", "64", "--steps", "10", "--batch-size", "4"]
    else:
        accuracy += ["--image-size", "256", "--steps", str(args.accuracy_steps)]
        accuracy += ["--categories", CATEGORY]
    return [
        Part("cuda-tests", budget("cuda-tests"), [tests], ["cuda-tests-gpu"]),
        Part("speed", budget("speed"), speed_runs, speed_stems),
        Part(
            "service",
            budget("service"),
            [
                [*service, "--clients", str(full), "--modes", "embedded", "redis"]
                + ["--out", str(work / "service-gpu")],
                [*service, "--clients", str(half), "--modes", "embedded"]
                + ["--out", str(work / "service-gpu-half-load")],
            ],
            ["service-gpu", "service-gpu-half-load"],
        ),
        Part("accuracy", budget("accuracy"), [accuracy], ["accuracy-gpu"]),
    ]


def run_part(part: Part, work: Path, env: dict[str, str]) -> Outcome:
    """The part's commands in order, within its budget; its output goes to its log."""
    began = time.monotonic()
    status = "ok"
    with (work / f"{part.name}.log").open("wb") as log:
        for command in part.commands:
            left = part.budget_s - (time.monotonic() - began)
            if left <= 0:
                status = f"ran out of its {part.budget_s:.0f} s budget"
                break
            log.write(f"$ {' '.join(command)}\n".encode())
            log.flush()
            # A session of its own: servers a benchmark started die with it on a timeout.
            process = subprocess.Popen(
                command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            try:
                code = process.wait(timeout=left)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                status = f"ran out of its {part.budget_s:.0f} s budget"
                break
            if code != 0 and status == "ok":
                status = f"failed (exit {code})"
    tables = [stem for stem in part.tables if (work / f"{stem}.json").is_file()]
    return Outcome(part.name, status, time.monotonic() - began, part.budget_s, tables)


def junit_table(xml: Path, stem: Path) -> None:
    """The CUDA tests' outcomes as a table: one row per test."""
    rows = []
    for case in ElementTree.parse(xml).getroot().iter("testcase"):
        outcome, detail = "passed", ""
        for kind in ("failure", "error", "skipped"):
            found = case.find(kind)
            if found is not None:
                outcome, detail = kind, (found.get("message") or "")[:200]
        rows.append({"test": case.get("name"), "outcome": outcome, "detail": detail})
    lines = ["| test | outcome | detail |", "|---|---|---|"]
    lines += [f"| {r['test']} | {r['outcome']} | {r['detail']} |" for r in rows]
    write_table(stem, {"rows": rows}, "\n".join(lines))


def random_model(models: Path, size: int) -> None:
    """The service's product: the compact preset at `size` px at random weights, with a full
    memory of normal patches (speed only)."""
    from benchmarks.speed import random_compact_folder
    from model.config import PRESETS, GladConfig

    config = GladConfig.model_validate({**PRESETS["compact"].model_dump(), "image_size": size})
    random_compact_folder(config, models / PRODUCT)


def tiny_category(root: Path) -> None:
    """A generated MVTec-layout category for the dry run's accuracy part."""
    from tests.images import write_mvtec_category

    write_mvtec_category(root / "widget", 64)


def write_report(
    out: Path, work: Path, outcomes: list[Outcome], env: dict[str, str], seconds: float
) -> None:
    """gpu-check.md, gpu-check.json and results.tar.gz under out."""
    header = ", ".join(f"{k} {v}" for k, v in env.items())
    tables: dict[str, Any] = {}
    lines = [f"# GPU check ({header})", "", f"{seconds:.0f} s in all.", ""]
    lines += ["| part | status | seconds | budget s |", "|---|---|---|---|"]
    lines += [f"| {o.name} | {o.status} | {o.seconds:.0f} | {o.budget_s:.0f} |" for o in outcomes]
    for outcome in outcomes:
        for stem in outcome.tables:
            data = json.loads((work / f"{stem}.json").read_text())
            tables[stem] = {**data, "environment": env}
            markdown = (work / f"{stem}.md").read_text().rstrip()
            write_table(work / stem, tables[stem], f"Ran on: {header}.\n\n{markdown}")
            lines += ["", f"## {stem}", "", markdown]
    summary = {"environment": env, "seconds": seconds, "parts": [asdict(o) for o in outcomes]}
    write_table(out / "gpu-check", {**summary, "tables": tables}, "\n".join(lines))
    with tarfile.open(out / "results.tar.gz", "w:gz") as archive:
        for outcome in outcomes:
            archive.add(work / f"{outcome.name}.log", f"logs/{outcome.name}.log")
            for stem in outcome.tables:
                for suffix in (".json", ".md"):
                    archive.add(work / f"{stem}{suffix}", f"{stem}{suffix}")


def _budget(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in BUDGETS or not seconds:
        raise argparse.ArgumentTypeError(f"give PART=SECONDS, PART one of {', '.join(BUDGETS)}")
    return name, float(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "results/gpu")))
    parser.add_argument("--data", type=Path, default=ROOT / ".gpu-bundle" / "data")
    parser.add_argument("--dry-run", action="store_true", help="on the CPU, at tiny sizes")
    parser.add_argument("--parts", nargs="+", choices=list(BUDGETS), help="default: all")
    parser.add_argument("--budget", type=_budget, action="append", default=[], help="PART=S")
    parser.add_argument("--accuracy-steps", type=int, default=1000, help="training steps")
    args = parser.parse_args()
    args.budget = dict(args.budget)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; --dry-run runs the parts on the CPU", file=sys.stderr
        )
        return 2
    began = time.monotonic()
    env = environment("cpu" if args.dry_run else "cuda")
    child_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    child_env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory(prefix="glad-gpu-check-") as folder:
        work = Path(folder)
        models, data = work / "models", args.data
        random_model(models, 64 if args.dry_run else 256)
        if args.dry_run:
            data = work / "data"
            tiny_category(data)
        outcomes = []
        for part in plan(args, work, models, data):
            if args.parts and part.name not in args.parts:
                continue
            print(f"gpu_check: {part.name} (budget {part.budget_s:.0f} s)", flush=True)
            outcome = run_part(part, work, child_env)
            if part.name == "cuda-tests" and (work / "cuda-tests.xml").is_file():
                junit_table(work / "cuda-tests.xml", work / "cuda-tests-gpu")
                outcome.tables = ["cuda-tests-gpu"]
            print(
                f"gpu_check: {part.name}: {outcome.status} in {outcome.seconds:.0f} s", flush=True
            )
            outcomes.append(outcome)
        write_report(args.out, work, outcomes, env, time.monotonic() - began)
    print(f"gpu_check: wrote {args.out / 'gpu-check.md'}, gpu-check.json, results.tar.gz")
    return 0 if all(o.status == "ok" for o in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
