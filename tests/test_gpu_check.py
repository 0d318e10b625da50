"""The GPU check's command cannot rot: its dry run exercises every part on the CPU, and a
part that fails or runs out of time is recorded while the others still run."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

from benchmarks.gpu_check import BUDGETS, Part, run_part

ROOT = Path(__file__).resolve().parent.parent


def test_the_dry_run_runs_every_part_and_writes_every_table(tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = [sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "gpu-check.json").read_text())
    assert [p["name"] for p in report["parts"]] == list(BUDGETS)
    assert all(p["status"] == "ok" for p in report["parts"]), report["parts"]
    assert report["environment"]["torch"]
    tables = report["tables"]
    assert set(tables) == {
        "cuda-tests-gpu",
        "speed-gpu-eager",
        "service-gpu",
        "service-gpu-half-load",
        "accuracy-gpu",
    }
    # Without CUDA every CUDA test is skipped, and says so: none is silently left out.
    assert {row["outcome"] for row in tables["cuda-tests-gpu"]["rows"]} == {"skipped"}
    assert len(tables["cuda-tests-gpu"]["rows"]) >= 5
    assert {row["mode"] for row in tables["service-gpu"]["rows"]} == {"embedded", "redis"}
    assert all(row["errors"] == 0 for row in tables["service-gpu"]["rows"])
    accuracy = {row["model"] for row in tables["accuracy-gpu"]["rows"]}
    assert {"preset", "reconstruction only", "memory only", "PatchCore (peer)"} <= accuracy
    markdown = (out / "gpu-check.md").read_text()
    assert "torch " in markdown and "| service | ok |" in markdown
    with tarfile.open(out / "results.tar.gz") as archive:
        names = set(archive.getnames())
    assert {"accuracy-gpu.json", "accuracy-gpu.md", "logs/service.log"} <= names


def test_a_failing_or_slow_part_is_recorded_and_the_next_command_is_not_run(
    tmp_path: Path,
) -> None:
    marker = tmp_path / "ran"
    after = [sys.executable, "-c", f"open({str(marker)!r}, 'w')"]
    failing = Part("speed", 60, [[sys.executable, "-c", "raise SystemExit(3)"]], [])
    outcome = run_part(failing, tmp_path, {})
    assert outcome.status == "failed (exit 3)"
    slow = Part("service", 1, [[sys.executable, "-c", "import time; time.sleep(30)"], after], [])
    outcome = run_part(slow, tmp_path, {})
    assert outcome.status == "ran out of its 1 s budget"
    assert outcome.seconds < 15
    assert not marker.exists()
    assert "raise SystemExit(3)" in (tmp_path / "speed.log").read_text()


def test_the_shell_entry_point_says_what_is_missing_without_a_bundle(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run"],
        env={"PATH": "/usr/bin:/bin", "GPU_BUNDLE": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "make gpu-bundle" in done.stderr
