"""Malformed requests against a real server: a 4xx or a 2xx each, never a 5xx or a leak.

benchmarks/fuzz.py sends 10,000 of them and runs schemathesis; this sends each kind a few
times.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx

from service.app import create_app
from service.settings import Settings
from tests.conftest import TINY_PRODUCT
from tests.fuzz_corpus import Corpus, malformed_requests, send_all
from tests.service_harness import png, serving


def test_malformed_requests_get_a_clear_4xx_and_leave_the_service_serving(
    tiny_model_dir: Path,
) -> None:
    kinds = len(Corpus(0, TINY_PRODUCT).generators())
    requests = list(malformed_requests(8 * kinds, TINY_PRODUCT))
    settings = Settings(model_dir=tiny_model_dir, max_wait_ms=20)
    with serving(create_app(settings)) as url:
        answers = asyncio.run(send_all(url, requests, clients=8))
        after = httpx.post(
            f"{url}/inspect/{TINY_PRODUCT}?heatmap=none",
            content=png(),
            headers={"Content-Type": "image/png"},
            timeout=60,
        )
    assert len(answers) == len(requests)
    server_errors = Counter(a.kind for a in answers if a.status >= 500)
    assert not server_errors, server_errors
    assert not [a for a in answers if a.leak], [a for a in answers if a.leak][:3]
    statuses = Counter(a.status for a in answers)
    # Each kind is answered; only the raw protocol errors may be a closed connection.
    assert all(a.status or a.kind == "raw protocol" for a in answers), statuses
    assert statuses[200] > 0 and sum(v for k, v in statuses.items() if 400 <= k < 500) > 0
    assert after.status_code == 200
