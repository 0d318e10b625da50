"""One client in a process of its own, for latencies a busy load generator cannot skew:
POSTs an image to a URL one request at a time and prints each status and time as JSON.

    python -m benchmarks.probe URL IMAGE --count 100 --gap-s 0.05
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit


def post(url: str, body: bytes, content_type: str, timeout_s: float) -> tuple[int, float]:
    """(status, seconds) of one POST on a fresh connection; status 0 when it failed."""
    parts = urlsplit(url)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    began = time.perf_counter()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout_s)
    try:
        connection.request("POST", target, body=body, headers={"Content-Type": content_type})
        response = connection.getresponse()
        response.read()
        status = response.status
    except (OSError, http.client.HTTPException):
        status = 0
    finally:
        connection.close()
    return status, time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("image", type=Path)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--gap-s", type=float, default=0.05, help="pause between requests")
    parser.add_argument("--content-type", default="image/png")
    parser.add_argument("--timeout-s", type=float, default=60.0)
    args = parser.parse_args()
    body = args.image.read_bytes()
    results = []
    for _ in range(args.count):
        results.append(post(args.url, body, args.content_type, args.timeout_s))
        time.sleep(args.gap_s)
    json.dump([{"status": s, "seconds": t} for s, t in results], sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
