"""The Python client and `glad inspect` against the real service on a loopback socket."""

from __future__ import annotations

import asyncio
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from service.app import create_app
from service.client import (
    FIRST_BACKOFF_S,
    LONGEST_BACKOFF_S,
    AsyncInspectionClient,
    InspectionClient,
    InspectionError,
    heatmap_png,
    retry_wait_s,
)
from service.settings import Settings
from tests.images import part_image, with_defect
from tests.service_harness import ROOT, free_port, metric, serving

API_KEY = "client-key"


@pytest.fixture(scope="module")
def base_url(tiny_model_dir: Path) -> Iterator[str]:
    # A queue of one: a few clients at once are sure to fill it and be told to retry.
    settings = Settings(model_dir=tiny_model_dir, api_key=API_KEY, max_queue=1, retry_after_s=1)
    with serving(create_app(settings)) as url:
        yield url


def test_every_form_of_image_gets_the_same_verdict(base_url: str, tmp_path: Path) -> None:
    image = with_defect(part_image(420))
    path = tmp_path / "part.png"
    image.save(path)
    jpeg = io.BytesIO()
    image.save(jpeg, format="JPEG", quality=98)
    forms = [path, str(path), path.read_bytes(), image, np.asarray(image)]
    with InspectionClient(base_url, API_KEY) as client:
        results = [client.inspect("widget", form) for form in forms]
        from_jpeg = client.inspect("widget", jpeg.getvalue(), heatmap="overlay")
    assert {r.raw_score for r in results} == {results[0].raw_score}
    assert all(r.is_anomalous and r.product == "widget" for r in results + [from_jpeg])
    assert results[0].heatmap is None
    picture = heatmap_png(from_jpeg)
    assert picture is not None and Image.open(io.BytesIO(picture)).size == (64, 64)


def test_refusals_raise_at_once_with_the_services_reason(base_url: str) -> None:
    with InspectionClient(base_url, "wrong-key") as client, pytest.raises(InspectionError) as no:
        client.inspect("widget", part_image(1))
    assert no.value.status == 401
    with InspectionClient(base_url, API_KEY) as client:
        with pytest.raises(InspectionError) as unknown:
            client.inspect("gadget", part_image(1))
        assert unknown.value.status == 404 and unknown.value.request_id
        with pytest.raises(InspectionError, match="415.*not a PNG"):
            client.inspect("widget", b"\x89PNG\r\n\x1a\n but not really")
        with pytest.raises(ValueError, match="uint8"):
            client.inspect("widget", np.zeros((8, 8), dtype=np.float32))


def test_a_full_queue_is_retried_afterretry_wait_s_until_answered(base_url: str) -> None:
    before = metric(
        httpx.get(f"{base_url}/metrics").text, "glad_requests_total", product="widget", status="429"
    )

    async def many() -> list[bool]:
        async with AsyncInspectionClient(base_url, API_KEY, deadline_s=120) as client:
            images = [part_image(500 + i) for i in range(8)]
            results = await asyncio.gather(*(client.inspect("widget", im) for im in images))
        return [r.is_anomalous for r in results]

    assert asyncio.run(many()) == [False] * 8
    refused = metric(
        httpx.get(f"{base_url}/metrics").text, "glad_requests_total", product="widget", status="429"
    )
    # Some were refused with 429 on the way, and every one was answered in the end.
    assert refused > before


def test_an_unreachable_service_is_retried_until_the_deadline() -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    client = InspectionClient(nobody, deadline_s=1.0)
    with client, pytest.raises(InspectionError, match="could not reach") as failed:
        client.inspect("widget", part_image(1))
    assert failed.value.status == 0


def test_glad_inspect_prints_a_line_per_file(base_url: str, tmp_path: Path) -> None:
    good, bad, broken = tmp_path / "good.png", tmp_path / "bad.png", tmp_path / "broken.png"
    part_image(430).save(good)
    with_defect(part_image(431)).save(bad)
    broken.write_bytes(b"not an image")
    command = [sys.executable, "-m", "service.cli", "inspect", base_url, "widget"]
    env = {"API_KEY": API_KEY, "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [*command, str(good), str(bad), "--heatmaps", str(tmp_path / "heat")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith(f"{good}: normal  score") and "denoise step" in lines[0]
    assert lines[1].startswith(f"{bad}: ANOMALOUS  score")
    assert {p.name for p in (tmp_path / "heat").iterdir()} == {
        "good.heatmap.png",
        "bad.heatmap.png",
    }
    as_json = subprocess.run(
        [*command, str(bad), str(broken), "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert as_json.returncode == 2
    assert json.loads(as_json.stdout)["is_anomalous"] is True
    assert f"{broken}: error: HTTP 415" in as_json.stderr


def test_the_wait_is_the_answersretry_wait_s_or_a_doubling_backoff() -> None:
    told = httpx.Response(429, headers={"Retry-After": "3"})
    assert [retry_wait_s(told, attempt) for attempt in (0, 5)] == [3.0, 3.0]
    untold = httpx.Response(503)
    waits = [retry_wait_s(untold, attempt) for attempt in range(8)]
    assert waits[:3] == [FIRST_BACKOFF_S, 2 * FIRST_BACKOFF_S, 4 * FIRST_BACKOFF_S]
    assert max(waits) == LONGEST_BACKOFF_S
