"""Malformed requests against a real service on this machine: what each kind is answered,
and that nothing is answered 5xx, shows a traceback or a path, or takes the server down.

Starts `glad serve` in embedded mode on the demo model (`glad demo`, trained here unless
--models names a MODEL_DIR holding `demo`), then sends:

- `--count` requests from tests/fuzz_corpus.py (13 kinds in turn: random, truncated and
  corrupted images, absurd headers, odd and foreign formats, bad multipart, content types,
  paths, queries, headers, other endpoints, and raw protocol errors on a socket);
- schemathesis against /openapi.json (`--examples` per operation, all its phases, the
  not_a_server_error check).

    python -m benchmarks.fuzz            # writes benchmarks/results/fuzz.{json,md}
    python -m benchmarks.fuzz --api-key K  # with API_KEY set: fuzz-api-key.{json,md}

Needs `pip install -c constraints.txt -e '.[fuzz]'` for schemathesis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.faults import PRODUCT, demo_models, png, rss_mib
from benchmarks.tables import write_table
from model.demo import part_image
from tests.fuzz_corpus import malformed_requests, send_all
from tests.service_harness import free_port

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass
class Row:
    source: str
    sent: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    server_errors: int = 0  # 5xx
    leaks: int = 0  # bodies showing a traceback or a server path
    closed: int = 0  # connections closed without an answer


def _row(source: str, statuses: list[int], leaks: int = 0) -> Row:
    counts = Counter(str(s) for s in statuses if s)
    return Row(
        source,
        sent=len(statuses),
        statuses=dict(sorted(counts.items())),
        server_errors=sum(s >= 500 for s in statuses),
        leaks=leaks,
        closed=sum(s == 0 for s in statuses),
    )


def corpus_rows(base: str, count: int, clients: int, headers: dict[str, str]) -> list[Row]:
    requests = list(malformed_requests(count, PRODUCT))
    answers = asyncio.run(send_all(base, requests, clients, headers))
    kinds = sorted({a.kind for a in answers})
    return [
        _row(
            kind,
            [a.status for a in answers if a.kind == kind],
            sum(bool(a.leak) for a in answers if a.kind == kind),
        )
        for kind in kinds
    ]


def keyless_row(base: str, count: int, clients: int) -> Row:
    """Corpus requests of another seed, sent without the API key."""
    requests = list(malformed_requests(count, PRODUCT, seed=1))
    answers = asyncio.run(send_all(base, requests, clients))
    leaks = sum(bool(a.leak) for a in answers)
    return _row(f"corpus without the key ({count})", [a.status for a in answers], leaks)


def schemathesis_row(base: str, examples: int, scratch: Path, headers: dict[str, str]) -> Row:
    events = scratch / "schemathesis.ndjson"
    command = [str(Path(sys.executable).parent / "schemathesis"), "run", f"{base}/openapi.json"]
    command += ["--checks", "not_a_server_error", "-n", str(examples), "--seed", "1"]
    for name, value in headers.items():
        command += ["-H", f"{name}: {value}"]
    command += ["--no-color", "--report", "ndjson", "--report-ndjson-path", str(events)]
    subprocess.run(command, cwd=scratch, stdout=subprocess.DEVNULL, check=False, timeout=1800)
    statuses = []
    for line in events.read_text().splitlines():
        event = json.loads(line)
        finished = event.get("ScenarioFinished")
        if finished is None:
            continue
        for interaction in finished["recorder"].get("interactions", {}).values():
            response = interaction.get("response")
            statuses.append(response["status_code"] if response else 0)
    return _row(f"schemathesis ({examples} examples per operation)", statuses)


def markdown(rows: list[Row]) -> str:
    lines = ["| source | sent | statuses | 5xx | leaks | closed |", "|---|---|---|---|---|---|"]
    for r in rows:
        statuses = " ".join(f"{k}:{v}" for k, v in r.statuses.items())
        lines.append(
            f"| {r.source} | {r.sent} | {statuses} | {r.server_errors} | {r.leaks} | {r.closed} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, help="a MODEL_DIR holding the demo product")
    parser.add_argument("--count", type=int, default=10_000, help="requests from the corpus")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients")
    parser.add_argument("--examples", type=int, default=1000, help="schemathesis, per operation")
    parser.add_argument(
        "--api-key",
        help="serve with this API_KEY: the corpus and schemathesis send it, and a tenth of "
        "the corpus again without it (default table: fuzz-api-key)",
    )
    parser.add_argument("--out", type=Path, help="table path, no suffix (default: fuzz)")
    args = parser.parse_args()
    out = args.out or RESULTS / ("fuzz-api-key" if args.api_key else "fuzz")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tempfile.TemporaryDirectory(prefix="glad-fuzz-") as folder:
        scratch = Path(folder)
        models = args.models or demo_models(scratch)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            "MODEL_DIR": str(models),
            "DATA_DIR": str(scratch / "data"),
            "PORT": str(port),
            "LOG_LEVEL": "error",
        }
        if args.api_key:
            env["API_KEY"] = args.api_key
        # What the server logs at ERROR is counted: bad input must not page anyone.
        log = (scratch / "server.log").open("w")
        server = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "serve"], cwd=ROOT, env=env, stderr=log
        )
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.5)
            idle = rss_mib(server.pid)
            began = time.monotonic()
            rows = corpus_rows(base, args.count, args.clients, headers)
            if args.api_key:
                rows.append(keyless_row(base, args.count // 10, args.clients))
            rows.append(schemathesis_row(base, args.examples, scratch, headers))
            seconds = time.monotonic() - began
            after = httpx.post(
                f"{base}/inspect/{PRODUCT}?heatmap=none",
                content=png(part_image(1)),
                headers={"Content-Type": "image/png", **headers},
                timeout=60,
            ).status_code
            summary = {
                "seconds": round(seconds, 1),
                "server_alive": server.poll() is None,
                "normal_request_after": after,
                "rss_idle_mib": round(idle, 1),
                "rss_after_mib": round(rss_mib(server.pid), 1),
            }
        finally:
            server.terminate()
            server.wait(30)
            log.close()
        logged = (scratch / "server.log").read_text()
        summary["server_errors_logged"] = logged.count("ERROR")
        summary["tracebacks_logged"] = logged.count("Traceback")
    rows.append(
        Row(
            "total",
            sent=sum(r.sent for r in rows),
            statuses=dict(sorted(sum((Counter(r.statuses) for r in rows), Counter()).items())),
            server_errors=sum(r.server_errors for r in rows),
            leaks=sum(r.leaks for r in rows),
            closed=sum(r.closed for r in rows),
        )
    )
    lines = [markdown(rows), "", ", ".join(f"{k}: {v}" for k, v in summary.items())]
    write_table(out, {"rows": [r.__dict__ for r in rows], **summary}, "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
