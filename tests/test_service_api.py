"""The HTTP API in embedded mode through the ASGI app: answers, bad input, auth, docs."""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from model.demo import DEFECT_BOX
from service.app import create_app
from service.settings import Settings
from tests.images import part_image, with_defect
from tests.service_harness import metric, png

MAX_BYTES = 200_000
MAX_PIXELS = 1_000_000
API_KEY = "s3cret-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def client(tiny_model_dir: Path) -> Iterator[TestClient]:
    settings = Settings(
        model_dir=tiny_model_dir,
        max_image_bytes=MAX_BYTES,
        max_pixels=MAX_PIXELS,
        api_key=API_KEY,
        request_timeout_s=30,
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as test_client:
        yield test_client


def post(
    client: TestClient,
    body: bytes | Iterator[bytes],
    product: str = "widget",
    headers: dict[str, str] | None = None,
    params: dict[str, str] | None = None,
) -> httpx.Response:
    """POST an image to /inspect with the API key; `headers` add to or replace the defaults."""
    merged = {"Content-Type": "image/png", **AUTH, **(headers or {})}
    return client.post(f"/inspect/{product}", content=body, headers=merged, params=params)


def png_with_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height: a decompression bomb's header."""
    data = bytearray(png(Image.new("RGB", (8, 8))))
    # IHDR starts at byte 8: length (4), type (4), width (4), height (4), ...
    data[16:24] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def test_inspect_answers_json_with_overlay_heatmap(client: TestClient) -> None:
    image = part_image(1).resize((96, 80))
    answer = post(client, png(image), headers={"X-Request-ID": "cam-7.frame-42"})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["request_id"] == "cam-7.frame-42" == answer.headers["x-request-id"]
    assert body["product"] == "widget"
    assert 0.0 <= body["score"] <= 1.0
    assert body["is_anomalous"] == (body["raw_score"] > body["threshold"])
    assert (body["image_width"], body["image_height"], body["model_image_size"]) == (96, 80, 64)
    assert body["model_version"] == client.get("/products/widget").json()["model_version"]
    timings = body["timings"]
    assert 0 <= timings["queue_wait_s"] <= timings["total_s"]
    assert 0 < timings["inference_s"] <= timings["total_s"]
    assert body["heatmap"]["kind"] == "overlay"
    heat = Image.open(io.BytesIO(base64.b64decode(body["heatmap"]["data"])))
    assert (heat.format, heat.size, heat.mode) == ("PNG", (96, 80), "RGB")


def test_clean_parts_are_judged_normal_and_damaged_parts_anomalous(client: TestClient) -> None:
    # Parts like the training ones (new seeds), and the same kind with a painted blotch.
    clean = [post(client, png(part_image(300 + i))).json() for i in range(6)]
    damaged = [post(client, png(with_defect(part_image(400 + i)))).json() for i in range(6)]
    assert [a["is_anomalous"] for a in clean] == [False] * 6, [a["score"] for a in clean]
    assert [a["is_anomalous"] for a in damaged] == [True] * 6, [a["score"] for a in damaged]
    assert max(a["score"] for a in clean) < 0.5 < min(a["score"] for a in damaged)


def test_the_heatmap_shows_where_the_defect_is(client: TestClient) -> None:
    answer = post(client, png(with_defect(part_image(410))), params={"heatmap": "map"}).json()
    levels = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]["data"]))))
    hottest = np.argwhere(levels >= np.quantile(levels, 0.99))
    # The box, grown by half a cell of the features' 8 px grid.
    x0, y0, x1, y1 = DEFECT_BOX
    assert (hottest[:, 1] >= x0 - 4).all() and (hottest[:, 1] <= x1 + 4).all(), hottest
    assert (hottest[:, 0] >= y0 - 4).all() and (hottest[:, 0] <= y1 + 4).all(), hottest
    assert (levels == 255).mean() < 0.02


def test_a_large_image_gets_a_heatmap_scaled_down_to_heatmap_max_side(client: TestClient) -> None:
    large = part_image(5).resize((1200, 800), Image.Resampling.NEAREST)
    for fmt, media_type in (("JPEG", "image/jpeg"), ("PNG", "image/png")):
        upload = io.BytesIO()
        large.save(upload, format=fmt)
        response = post(client, upload.getvalue(), headers={"Content-Type": media_type})
        assert response.status_code == 200, (fmt, response.text)
        answer = response.json()
        assert (answer["image_width"], answer["image_height"]) == (1200, 800)
        heat = Image.open(io.BytesIO(base64.b64decode(answer["heatmap"]["data"])))
        assert heat.size == (1024, 683)  # HEATMAP_MAX_SIDE's default, the aspect kept


def test_bare_map_none_and_multipart(client: TestClient) -> None:
    bare = post(client, png(seed=2), params={"heatmap": "map"}).json()["heatmap"]
    assert bare["kind"] == "map"
    assert Image.open(io.BytesIO(base64.b64decode(bare["data"]))).mode == "L"
    assert post(client, png(seed=2), params={"heatmap": "none"}).json()["heatmap"] is None
    jpeg = io.BytesIO()
    part_image(3).save(jpeg, format="JPEG")
    files = {"file": ("part.jpg", jpeg.getvalue(), "image/jpeg")}
    answer = client.post("/inspect/widget", files=files, headers=AUTH)
    assert answer.status_code == 200, answer.text
    assert answer.json()["image_width"] == 64
    wrong_field = client.post("/inspect/widget", files={"image": files["file"]}, headers=AUTH)
    assert wrong_field.status_code == 422
    assert "'file'" in wrong_field.json()["detail"]


def test_accept_png_answers_the_heatmap_with_the_verdict_in_headers(client: TestClient) -> None:
    answer = post(client, png(seed=4), headers={"Accept": "image/png"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(answer.content)).size == (64, 64)
    assert answer.headers["x-glad-verdict"] in {"normal", "anomalous"}
    assert 0.0 <= float(answer.headers["x-glad-score"]) <= 1.0
    assert "inference;dur=" in answer.headers["server-timing"]
    refused = post(client, png(), params={"heatmap": "none"}, headers={"Accept": "image/png"})
    assert refused.status_code == 422


@pytest.mark.parametrize(
    ("body", "content_type", "status", "words"),
    [
        (b"", "image/png", 422, "empty"),
        (b"this is not an image at all", "image/png", 415, "not a PNG"),
        (png()[:200], "image/png", 422, "truncated"),
        (png(), "text/plain", 415, "Content-Type"),
        (png_with_size(40_000, 40_000), "image/png", 413, "too large"),
        (png_with_size(1200, 1000), "image/png", 413, "MAX_PIXELS"),
        (png(Image.effect_noise((300, 300), 90).convert("RGB")), "image/png", 413, "limit"),
    ],
    ids=["empty", "not-image", "truncated", "text-type", "bomb", "pixels", "bytes"],
)
def test_bad_images_get_a_clear_4xx(
    client: TestClient, body: bytes, content_type: str, status: int, words: str
) -> None:
    answer = post(client, body, headers={"Content-Type": content_type})
    assert answer.status_code == status, answer.text
    assert words in answer.json()["detail"]
    assert answer.json()["request_id"] == answer.headers["x-request-id"]


def test_streamed_body_over_the_limit_is_cut_off(client: TestClient) -> None:
    # No Content-Length: the limit must hold while the body streams in.
    chunks = (b"\0" * 50_000 for _ in range(10))
    answer = post(client, chunks)
    assert answer.status_code == 413
    assert str(MAX_BYTES) in answer.json()["detail"]


@pytest.mark.parametrize(
    ("product", "statuses"),
    [
        ("gadget", {404}),
        ("Widget", {422}),
        ("widget%00", {422}),
        ("a" * 65, {422}),
        ("-widget", {422}),
        # The client resolves /inspect/.. to /, the operator page, which takes no POST.
        ("..", {405}),
        ("%2e%2e%2fetc%2fpasswd", {404, 422}),
        ("..%2F..%2Fmodels%2Fwidget", {404, 422}),
    ],
)
def test_bad_product_names_are_refused(
    client: TestClient, product: str, statuses: set[int]
) -> None:
    answer = post(client, png(), product=product)
    assert answer.status_code in statuses, answer.text


def test_api_key_is_required(client: TestClient) -> None:
    assert post(client, png(), headers={"Authorization": ""}).status_code == 401
    wrong = post(client, png(), headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert client.get("/healthz").status_code == 200


def test_unexpected_errors_answer_json_500_without_traceback(client: TestClient) -> None:
    def broken() -> None:
        raise RuntimeError("secret internals")

    client.app.add_api_route("/broken", broken)  # type: ignore[attr-defined]
    answer = client.get("/broken", headers={"X-Request-ID": "req-500"})
    assert answer.status_code == 500
    assert answer.json()["request_id"] == "req-500"
    assert "secret" not in answer.text and "Traceback" not in answer.text


def test_products_health_and_metrics(client: TestClient) -> None:
    products = client.get("/products").json()["products"]
    assert [p["name"] for p in products] == ["widget"]
    assert products[0]["image_size"] == 64 and products[0]["live_workers"] == 1
    # A model with a memory of normal patches says how many it holds.
    assert products[0]["memory_patches"] > 0
    assert client.get("/products/gadget").status_code == 404
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["products"] == {"widget": 1}
    text = client.get("/metrics").text
    parts = metric(text, "glad_inspected_parts_total", product="widget")
    refused = metric(text, "glad_requests_total", product="widget", status="415")
    assert post(client, png(seed=9)).status_code == 200
    assert post(client, png(seed=9), headers={"Content-Type": "text/plain"}).status_code == 415
    text = client.get("/metrics").text
    assert metric(text, "glad_inspected_parts_total", product="widget") == parts + 1
    assert metric(text, "glad_requests_total", product="widget", status="200") >= 1
    assert metric(text, "glad_requests_total", product="widget", status="415") == refused + 1
    assert metric(text, "glad_model_info", product="widget", image_size="64") == 1
    for name in (
        "glad_request_duration_seconds_count",
        "glad_queue_wait_seconds_count",
        "glad_inference_duration_seconds_count",
        "glad_batch_size_count",
        "glad_denoise_step_count",
    ):
        assert metric(text, name, product="widget") >= 1, name
    assert 'glad_queue_depth{product="widget"} 0.0' in text
    assert 'glad_dead_letter_total{product="widget"} 0.0' in text


def test_openapi_documents_the_bodies_and_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/inspect/{product}"]["post"]
    assert {"image/png", "image/jpeg", "multipart/form-data"} <= set(
        operation["requestBody"]["content"]
    )
    assert spec["components"]["schemas"]["Inspection"]["examples"]
    assert client.get("/docs").status_code == 200


def test_openapi_declares_bearer_auth_only_when_a_key_is_set(
    client: TestClient, tmp_path: Path
) -> None:
    assert "securitySchemes" in client.get("/openapi.json").json()["components"]
    spec = create_app(Settings(model_dir=tmp_path)).openapi()
    assert "securitySchemes" not in spec.get("components", {})
    assert all("security" not in op for ops in spec["paths"].values() for op in ops.values())


def test_api_key_reads_closes_products_and_metrics(tmp_path: Path) -> None:
    settings = Settings(model_dir=tmp_path, api_key=API_KEY, api_key_reads=True)
    with TestClient(create_app(settings)) as closed:
        for path in ("/products", "/metrics", "/products/widget"):
            assert closed.get(path).status_code == 401, path
        assert closed.get("/products", headers=AUTH).status_code == 200
        assert closed.get("/metrics", headers=AUTH).status_code == 200
        assert closed.get("/healthz").status_code == 200
