"""Embedded mode end to end over a real socket: batching, hot reload, the CLI."""

from __future__ import annotations

import asyncio
import base64
import io
import logging
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from model.checkpoint import load_model_folder, rewrite_calibration
from model.inspector import Inspector
from service import imaging
from service.app import create_app
from service.cli import main
from service.settings import Settings
from tests.images import part_image
from tests.service_harness import metric, png, serving

PNG = {"Content-Type": "image/png"}


async def inspect_many(base: str, count: int, product: str = "widget") -> list[httpx.Response]:
    url = f"/inspect/{product}?heatmap=none"
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        posts = (client.post(url, content=png(seed=i), headers=PNG) for i in range(count))
        return list(await asyncio.gather(*posts))


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path) -> Iterator[str]:
    """An embedded service on a real socket, batching up to 8 within 100 ms."""
    settings = Settings(model_dir=tiny_model_dir, max_batch=8, max_wait_ms=100)
    with serving(create_app(settings)) as url:
        yield url


def test_concurrent_requests_share_batches(base: str) -> None:
    before = httpx.get(f"{base}/metrics").text
    answers = asyncio.run(inspect_many(base, 8))
    after = httpx.get(f"{base}/metrics").text
    assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
    assert len({a.json()["request_id"] for a in answers}) == 8

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("glad_batch_size_sum", product="widget") == 8
    assert delta("glad_batch_size_count", product="widget") < 8
    assert delta("glad_requests_total", product="widget", status="200") == 8


def test_a_large_upload_is_answered_at_its_size_as_sent(base: str) -> None:
    # Over imaging.LARGE_PIXELS: decoded on the API's low-priority thread, forwarded shrunk.
    large = part_image(4).resize((2400, 2000), Image.Resampling.NEAREST)
    answer = httpx.post(f"{base}/inspect/widget", content=png(large), headers=PNG, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert (body["image_width"], body["image_height"]) == (2400, 2000)
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["data"])))
    assert heat.size == (1024, 853)


def test_a_part_is_decoded_once_in_one_process(base: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The worker's decode is the check: the API reads only the header of an image that is
    # not large, and a corrupt one is refused by the worker with the same 422.
    decoded: list[int] = []
    decode = imaging._decode
    monkeypatch.setattr(imaging, "_decode", lambda *args: decoded.append(1) or decode(*args))
    answer = httpx.post(f"{base}/inspect/widget", content=png(seed=3), headers=PNG, timeout=60)
    assert answer.status_code == 200, answer.text
    assert len(decoded) == 1
    truncated = httpx.post(f"{base}/inspect/widget", content=png(seed=3)[:200], headers=PNG)
    assert truncated.status_code == 422
    assert "truncated" in truncated.json()["detail"]


def test_requests_with_the_same_id_get_their_own_answers(base: str) -> None:
    async def two() -> list[httpx.Response]:
        headers = {**PNG, "X-Request-ID": "same"}
        images = [png(part_image(i).resize((64 + i, 64))) for i in range(2)]
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:
            posts = (
                client.post("/inspect/widget", content=image, headers=headers) for image in images
            )
            return list(await asyncio.gather(*posts))

    widths = [a.json()["image_width"] for a in asyncio.run(two())]
    assert widths == [64, 65]


def test_new_changed_and_broken_folders_are_picked_up_without_dropping_requests(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "widget", models / "widget")
    settings = Settings(model_dir=models, reload_interval_s=0.2, max_wait_ms=0)
    caplog.set_level(logging.ERROR, logger="service.registry")
    with serving(create_app(settings)) as base:
        first = httpx.get(f"{base}/products/widget").json()

        shutil.copytree(tiny_model_dir / "widget", models / "gizmo")
        (models / "broken").mkdir()
        (models / "broken" / "config.json").write_text("{}")
        # A recalibration, as `glad calibrate` writes it.
        loaded = load_model_folder(models / "widget")
        raised = loaded.calibration.model_copy(update={"threshold": first["threshold"] + 1.0})
        rewrite_calibration(models / "widget", raised, loaded.references)

        # Requests keep flowing while the changed model loads and is swapped in.
        answers: list[httpx.Response] = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            answers += asyncio.run(inspect_many(base, 2))
            names = [p["name"] for p in httpx.get(f"{base}/products").json()["products"]]
            widget = httpx.get(f"{base}/products/widget").json()
            if "gizmo" in names and widget["threshold"] != first["threshold"]:
                break
        gizmo = asyncio.run(inspect_many(base, 1, "gizmo"))
        broken = httpx.post(f"{base}/inspect/broken", content=png(), headers=PNG)

    assert names == ["gizmo", "widget"]
    assert widget["threshold"] == pytest.approx(first["threshold"] + 1.0)
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert gizmo[0].status_code == 200
    assert broken.status_code == 404
    assert any("broken" in r.getMessage() and "missing" in r.getMessage() for r in caplog.records)


def test_cli_commands_and_their_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for command in (["--help"], ["serve", "--help"], ["worker", "--help"]):
        with pytest.raises(SystemExit) as leaving:
            main(command)
        assert leaving.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("train", "eval", "predict", "serve", "worker", "REDIS_URL"))
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("API_WORKERS", "1")  # restored afterwards: `serve` writes flags there
    assert main(["worker"]) == 2
    assert main(["serve", "--workers", "2"]) == 2
    assert "REDIS_URL" in capsys.readouterr().err


def _answer_to(url: str, head: bytes, body: bytes) -> bytes:
    """What the server answers a raw request, read until it closes the connection."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as raw:
        raw.sendall(head + body)
        answer = b""
        while chunk := raw.recv(4096):
            answer += chunk
    return answer


def test_a_stalled_body_is_answered_408_before_it_is_routed(tiny_model_dir: Path) -> None:
    settings = Settings(model_dir=tiny_model_dir, body_timeout_s=1.0, api_key="k")
    head = b"Host: x\r\nContent-Type: image/png\r\nContent-Length: 100000\r\n\r\n"
    with serving(create_app(settings)) as url:
        stalled = _answer_to(url, b"POST /inspect/widget HTTP/1.1\r\n" + head, b"\x89PNG")
        # Not routed before its body is whole: neither its product nor its key is looked at.
        unknown = _answer_to(url, b"POST /inspect/gadget HTTP/1.1\r\n" + head, b"\x89PNG")
        # Meanwhile and after, others are served.
        served = httpx.post(
            f"{url}/inspect/widget", content=png(), headers={**PNG, "Authorization": "Bearer k"}
        )
        counted = metric(
            httpx.get(f"{url}/metrics").text, "glad_requests_total", product="-", status="408"
        )
    assert stalled.startswith(b"HTTP/1.1 408"), stalled[:200]
    assert b"BODY_TIMEOUT_S" in stalled
    assert b"x-request-id" in stalled.lower()
    assert unknown.startswith(b"HTTP/1.1 408"), unknown[:200]
    assert served.status_code == 200, served.text
    assert counted == 2


def test_a_body_declared_too_long_is_refused_before_it_is_sent(base: str) -> None:
    # The client waits for `100 Continue`, which it must not get.
    head = (
        b"POST /inspect/widget HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        b"Expect: 100-continue\r\nContent-Length: 999999999\r\n\r\n"
    )
    answer = _answer_to(base, head, b"")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b"MAX_IMAGE_BYTES" in answer


def test_a_request_uvicorn_refused_itself_is_not_answered_again(
    base: str, caplog: pytest.LogCaptureFixture
) -> None:
    # A malformed chunk arrives with the head: uvicorn answers 400 and closes before the
    # route runs, and the route's own 415 must not be sent on after it (an ERROR log).
    host, port = base.removeprefix("http://").split(":")
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=30) as raw:
            raw.sendall(
                b"POST /inspect/widget HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"zz\r\n\r\n"
            )
            assert raw.recv(4096).startswith(b"HTTP/1.1 400")
    assert httpx.get(f"{base}/healthz").status_code == 200
    time.sleep(0.2)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_batches_run_in_as_many_lanes_at_once_as_inference_lanes(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import inference

    running, most = [0], [0]
    lock = threading.Lock()
    inspect = inference.inspect_guarded

    def slow_inspect(inspector, images):  # type: ignore[no-untyped-def]
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.3)  # long enough for the next batch to be collected and started
        try:
            return inspect(inspector, images)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(inference, "inspect_guarded", slow_inspect)
    settings = Settings(model_dir=tiny_model_dir, max_batch=2, max_wait_ms=0, inference_lanes=2)
    with serving(create_app(settings)) as url:
        answers = asyncio.run(inspect_many(url, 8))
    assert [a.status_code for a in answers] == [200] * 8
    assert most[0] == 2


def test_one_inspector_in_two_lanes_scores_as_it_does_alone(tiny_model_dir: Path) -> None:
    inspector = Inspector.load(tiny_model_dir / "widget", "cpu")
    batches = [[part_image(seed) for seed in range(k, k + 3)] for k in (0, 3)]
    alone = [[r.raw_score for r in inspector.inspect(b)] for b in batches]
    with ThreadPoolExecutor(2) as lanes:
        together = list(lanes.map(lambda b: [r.raw_score for r in inspector.inspect(b)], batches))
    assert together == alone


def test_a_compiled_model_runs_in_one_lane() -> None:
    assert Settings(device="cuda").lanes == 1
    assert Settings(device="cpu").lanes == 2
    with pytest.raises(ValueError, match="INFERENCE_LANES above 1 needs COMPILE=0"):
        Settings(device="cuda", inference_lanes=2)


def test_a_batch_answers_its_smallest_images_first() -> None:
    from service.inference import Batch, _Item
    from service.wire import Delivery, Job

    def item(size: tuple[int, int]) -> _Item:
        job = Job(request_id=f"{size}", product="widget", heatmap="overlay", deadline=0.0)
        return _Item(Delivery(entry_id="1-0", job=job, image=b"", deliveries=1), size=size)

    batch = Batch([item((6000, 6000)), item((256, 256)), item((0, 0)), item((640, 480))], 0.0)
    assert [i.size for i in batch.answer_order()] == [(0, 0), (256, 256), (640, 480), (6000, 6000)]
