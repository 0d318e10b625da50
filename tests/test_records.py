"""The record of inspections: the store on a real SQLite file and a real PostgreSQL server,
the media folder's policy, the recorder's buffer while the database is down or restarts,
and the endpoints end to end."""

from __future__ import annotations

import asyncio
import csv
import io
import os
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from prometheus_client import CollectorRegistry
from sqlalchemy import create_engine, text

from service.app import create_app
from service.cli import main
from service.media import KeepImages, MediaStore
from service.metrics import RecordMetrics
from service.recorder import Pending, Recorder
from service.records import Base, Filters, RecordStore, ReviewLabel
from service.settings import Settings
from tests.images import part_image, with_defect
from tests.postgres_server import PostgresServer, postgres_bin
from tests.service_harness import png, serving

PNG = {"Content-Type": "image/png"}


def _row(number: int, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "id": f"{number:032x}",
        "request_id": f"request-{number}",
        "time": datetime(2026, 12, 1, 8, 0) + timedelta(minutes=number),
        "product": "widget",
        "model_version": "abc123",
        "score": 0.2,
        "raw_score": 1.0,
        "threshold": 2.0,
        "is_anomalous": False,
        "denoise_step": 0,
        "queue_wait_s": 0.01,
        "inference_s": 0.1,
        "total_s": 0.12,
        "part_id": None,
        "camera_id": None,
        "line_id": None,
        "media_expired": False,
    }
    return {**row, **overrides}


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    if postgres_bin() is None:
        pytest.skip("no PostgreSQL installed (make postgres installs Debian's)")
    server = PostgresServer()
    server.start()
    yield server
    server.stop()
    server.remove()


def _new_database(server: PostgresServer) -> str:
    """A database of the test's own on the module's server; its URL."""
    name = f"t{uuid.uuid4().hex[:12]}"
    engine = create_engine(server.url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    engine.dispose()
    return server.url.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'records.db'}"
    return _new_database(request.getfixturevalue("postgres"))


@pytest.fixture
def store(database_url: str) -> Iterator[RecordStore]:
    store = RecordStore(database_url)
    store.migrate()
    yield store
    store.close()


def test_the_migration_builds_the_table_the_code_declares(store: RecordStore) -> None:
    with store.engine.connect() as connection:
        differences = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert differences == []
    store.migrate()  # a second start finds the schema current


def test_records_are_queried_newest_first_with_filters_and_pages(store: RecordStore) -> None:
    store.write([_row(i, is_anomalous=i % 3 == 0, part_id=f"P{i}") for i in range(10)])
    store.write([_row(4, score=0.99)])  # a retried write: the first record stays
    rows, total = store.query(Filters(), limit=4, offset=0)
    assert total == 10
    assert [r.request_id for r in rows] == ["request-9", "request-8", "request-7", "request-6"]
    assert store.get(f"{4:032x}").score == 0.2
    rows, total = store.query(Filters(anomalous=True), limit=50, offset=0)
    assert [r.request_id for r in rows] == ["request-9", "request-6", "request-3", "request-0"]
    since = datetime(2026, 12, 1, 8, 2, tzinfo=UTC)
    until = datetime(2026, 12, 1, 10, 5, tzinfo=timezone(timedelta(hours=2)))  # 08:05 UTC
    rows, total = store.query(Filters(since=since, until=until), 50, 0)
    assert [r.request_id for r in rows] == ["request-4", "request-3", "request-2"]
    rows, _ = store.query(Filters(part_id="P7"), 50, 0)
    assert [r.request_id for r in rows] == ["request-7"]


def test_a_review_is_kept_with_who_and_when_and_can_be_filtered(store: RecordStore) -> None:
    store.write([_row(1), _row(2)])
    reviewed = store.review(f"{1:032x}", ReviewLabel.false_alarm, "glare", "ana")
    assert reviewed is not None and reviewed.reviewed_by == "ana"
    assert store.review(f"{99:032x}", ReviewLabel.defect, "", "ana") is None
    rows, _ = store.query(Filters(reviewed=True), 50, 0)
    assert [(r.review_label, r.review_note) for r in rows] == [("false_alarm", "glare")]
    rows, _ = store.query(Filters(reviewed=False), 50, 0)
    assert [r.request_id for r in rows] == ["request-2"]
    rows, _ = store.query(Filters(label=ReviewLabel.defect), 50, 0)
    assert rows == []


def test_media_past_their_age_or_over_the_cap_go_oldest_first(tmp_path: Path) -> None:
    media = MediaStore(tmp_path, KeepImages.anomalous, max_age_s=3600, max_bytes=2500)
    assert media.wants(True) and not media.wants(False)
    paths = []
    for i in range(4):
        paths.append(media.save(f"{i:032x}", "widget", "2026-12-01", b"\x89PNG" + bytes(996), None))
        os.utime(tmp_path / paths[-1][0], (1000.0 + i, 1000.0 + i))
    assert paths[0][0] == f"2026-12-01/widget/{0:032x}.png"
    # 4000 bytes against a 2500 cap: the two oldest go, though none is past its age.
    assert media.sweep(now=1010.0) == [paths[0][0], paths[1][0]]
    assert media.path(paths[2][0]) is not None and media.path(paths[0][0]) is None
    assert media.sweep(now=1002.0 + 3600.5) == [paths[2][0]]  # past its age; the last is not
    assert media.path("../../etc/passwd") is None


def test_while_the_database_is_down_records_wait_and_past_the_buffer_are_dropped(
    tmp_path: Path,
) -> None:
    class FlakyStore(RecordStore):
        down = True

        def write(self, rows):  # noqa: ANN001, ANN202
            if self.down:
                raise ConnectionError("database unreachable")
            super().write(rows)

    store = FlakyStore(f"sqlite:///{tmp_path / 'records.db'}")
    media = MediaStore(tmp_path / "media", KeepImages.all, 3600, 2**30)
    metrics = RecordMetrics(CollectorRegistry())
    recorder = Recorder(store, media, capacity=5, metrics=metrics)

    async def scenario() -> None:
        task = asyncio.create_task(recorder.run())
        accepted = [recorder.submit(Pending(_row(i), image=png(), heatmap=None)) for i in range(7)]
        assert accepted == [True] * 5 + [False] * 2
        await asyncio.sleep(1.0)
        assert recorder.waiting == 5  # nothing lost while the database is down
        store.down = False
        deadline = time.monotonic() + 20
        while recorder.waiting and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await recorder.stop(task)

    asyncio.run(scenario())
    assert metrics.written._value.get() == 5 and metrics.dropped._value.get() == 2
    check = RecordStore(f"sqlite:///{tmp_path / 'records.db'}")
    rows, total = check.query(Filters(), 50, 0)
    assert total == 5
    assert all(media.path(r.image_path) is not None for r in rows)


def test_a_database_restart_loses_no_record_within_the_buffer(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    url = _new_database(postgres)
    store = RecordStore(url)
    metrics = RecordMetrics(CollectorRegistry())
    media = MediaStore(tmp_path / "media", KeepImages.none, 3600, 2**30)
    recorder = Recorder(store, media, capacity=1000, metrics=metrics)

    async def scenario() -> None:
        task = asyncio.create_task(recorder.run())
        for i in range(10):
            recorder.submit(Pending(_row(i)))
        await _drained(recorder)
        postgres.stop()
        try:
            for i in range(10, 60):
                assert recorder.submit(Pending(_row(i)))
            await asyncio.sleep(1.5)
            assert recorder.waiting == 50  # they wait; none is lost
        finally:
            postgres.start()
        await _drained(recorder)
        await recorder.stop(task)

    asyncio.run(scenario())
    assert metrics.dropped._value.get() == 0 and metrics.written._value.get() == 60
    check = RecordStore(url)
    assert check.query(Filters(), 1, 0)[1] == 60
    check.close()


async def _drained(recorder: Recorder, limit_s: float = 30) -> None:
    deadline = time.monotonic() + limit_s
    while recorder.waiting:
        assert time.monotonic() < deadline, f"{recorder.waiting} records still wait"
        await asyncio.sleep(0.1)


@pytest.fixture(scope="module")
def recording(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """An embedded service that records into a folder of its own."""
    data = tmp_path_factory.mktemp("recording")
    settings = Settings(model_dir=tiny_model_dir, data_dir=data, max_wait_ms=0)
    with serving(create_app(settings)) as url:
        yield url


def _recorded(base: str, record_id: str) -> dict:
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(f"{base}/inspections/{record_id}")
        if answer.status_code == 200 or time.monotonic() > deadline:
            assert answer.status_code == 200, answer.text
            return answer.json()
        time.sleep(0.1)


def test_every_answer_is_recorded_with_the_parts_identity(recording: str) -> None:
    base = recording
    headers = {**PNG, "X-Part-Id": "SN-0001", "X-Camera-Id": "cam 2"}
    answer = httpx.post(
        f"{base}/inspect/widget?line_id=L1", content=png(part_image(3)), headers=headers, timeout=60
    )
    assert answer.status_code == 200, answer.text
    verdict = answer.json()
    record = _recorded(base, verdict["inspection_id"])
    assert (record["part_id"], record["camera_id"], record["line_id"]) == ("SN-0001", "cam 2", "L1")
    for field in ("request_id", "product", "model_version", "score", "raw_score", "threshold"):
        assert record[field] == verdict[field], field
    assert record["is_anomalous"] is verdict["is_anomalous"] is False
    assert record["total_s"] == pytest.approx(verdict["timings"]["total_s"])
    # The default policy keeps anomalous parts' images only.
    assert record["image_url"] is None and record["heatmap_url"] is None
    assert httpx.get(f"{base}/inspections/{record['id']}/image").status_code == 404

    damaged = httpx.post(
        f"{base}/inspect/widget",
        content=png(with_defect(part_image(4))),
        headers={**PNG, "Accept": "image/png"},
        timeout=60,
    )
    assert damaged.status_code == 200 and damaged.headers["X-Glad-Verdict"] == "anomalous"
    record = _recorded(base, damaged.headers["X-Glad-Inspection-Id"])
    image = httpx.get(f"{base}{record['image_url']}")
    heatmap = httpx.get(f"{base}{record['heatmap_url']}")
    assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
    assert heatmap.content == damaged.content

    listed = httpx.get(f"{base}/inspections", params={"verdict": "anomalous", "limit": 1}).json()
    assert listed["items"][0]["id"] == record["id"] and listed["limit"] == 1
    assert httpx.get(f"{base}/inspections", params={"part_id": "SN-0001"}).json()["total"] == 1


def test_a_review_labels_the_record_and_the_export_lists_it(recording: str) -> None:
    base = recording
    answer = httpx.post(f"{base}/inspect/widget", content=png(seed=7), headers=PNG, timeout=60)
    record_id = answer.json()["inspection_id"]
    _recorded(base, record_id)
    review = {"label": "false_alarm", "reviewer": "qe-ana", "note": "=HYPERLINK(x) glare"}
    reviewed = httpx.post(f"{base}/inspections/{record_id}/review", json=review)
    assert reviewed.status_code == 200, reviewed.text
    body = reviewed.json()
    assert (body["review_label"], body["reviewed_by"]) == ("false_alarm", "qe-ana")
    assert datetime.fromisoformat(body["reviewed_at"]) <= datetime.now(UTC)
    exported = httpx.get(f"{base}/inspections.csv", params={"label": "false_alarm"})
    assert exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [r["id"] for r in rows] == [record_id]
    assert rows[0]["review_note"] == "'=HYPERLINK(x) glare"  # never run as a formula
    metrics = httpx.get(f"{base}/metrics").text
    assert 'glad_reviews_total{label="false_alarm"} 1.0' in metrics
    assert "glad_records_written_total" in metrics


@pytest.mark.parametrize(
    ("headers", "params", "what"),
    [
        ({"X-Part-Id": "SN\t01"}, {}, "X-Part-Id"),  # the HTTP parser refuses most others
        ({}, {"part_id": "x" * 129}, "X-Part-Id"),
        ({}, {"camera_id": ""}, "X-Camera-Id"),
        ({}, {"line_id": "L\n1"}, "X-Line-Id"),
    ],
)
def test_a_bad_part_identity_is_refused_and_nothing_is_recorded(
    recording: str, headers: dict[str, str], params: dict[str, str], what: str
) -> None:
    before = httpx.get(f"{recording}/inspections").json()["total"]
    answer = httpx.post(
        f"{recording}/inspect/widget",
        content=png(seed=1),
        headers={**PNG, **headers},
        params=params,
        timeout=60,
    )
    assert answer.status_code == 422
    assert what in answer.json()["detail"]
    time.sleep(0.3)
    assert httpx.get(f"{recording}/inspections").json()["total"] == before


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "says"),
    [
        ("post", f"/inspections/{'f' * 32}/review", {"label": "defect", "reviewer": "a"}, 404,
         "no recorded inspection"),
        ("post", f"/inspections/{'f' * 32}/review", {"label": "maybe", "reviewer": "a"}, 422,
         "label"),
        ("post", f"/inspections/{'f' * 32}/review", {"label": "defect"}, 422, "reviewer"),
        ("get", "/inspections/not-an-id", None, 422, "record_id"),
        ("get", "/inspections?since=yesterday", None, 422, "since"),
        ("get", "/inspections?since=2026-12-02T00:00:00&until=2026-12-01T00:00:00", None, 422,
         "since must be before until"),
        ("get", "/inspections?verdict=bad", None, 422, "verdict"),
        ("get", "/inspections?limit=501", None, 422, "limit"),
    ],
)  # fmt: skip
def test_bad_queries_and_reviews_say_what_to_fix(
    recording: str, method: str, path: str, body: object, status: int, says: str
) -> None:
    answer = httpx.request(method, f"{recording}{path}", json=body)
    assert answer.status_code == status, answer.text
    assert says in answer.text


def test_the_api_key_guards_the_records(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(model_dir=tiny_model_dir, data_dir=tmp_path, api_key="s3cret")
    with serving(create_app(settings)) as base:
        assert httpx.get(f"{base}/inspections").status_code == 401
        assert httpx.get(f"{base}/inspections.csv").status_code == 401
        key = {"Authorization": "Bearer s3cret"}
        assert httpx.get(f"{base}/inspections", headers=key).status_code == 200


def test_without_a_record_the_service_answers_as_before_and_says_so(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    settings = Settings(model_dir=tiny_model_dir, data_dir=tmp_path, record=False)
    with serving(create_app(settings)) as base:
        answer = httpx.post(f"{base}/inspect/widget", content=png(seed=2), headers=PNG, timeout=60)
        assert answer.status_code == 200 and answer.json()["inspection_id"] is None
        listed = httpx.get(f"{base}/inspections")
        assert listed.status_code == 404 and "DATABASE_URL" in listed.text
    assert not (tmp_path / "inspections.db").exists()


def test_review_export_lays_out_false_alarms_for_training_and_defects_for_evaluation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    store = RecordStore(f"sqlite:///{tmp_path / 'inspections.db'}")
    store.migrate()
    media = MediaStore(tmp_path / "media", KeepImages.all, 3600, 2**30)
    rows = []
    for i in range(4):
        image, _ = media.save(f"{i:032x}", "widget", "2026-12-01", png(seed=i), None)
        rows.append(_row(i, image_path=image, is_anomalous=True))
    rows.append(_row(9, is_anomalous=True))  # its image was never kept
    store.write(rows)
    for i, label in [(0, "false_alarm"), (1, "false_alarm"), (2, "defect"), (9, "false_alarm")]:
        store.review(f"{i:032x}", ReviewLabel(label), "", "ana")
    store.close()
    monkeypatch.setenv("DATA_DIR", str(tmp_path))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    out = tmp_path / "export"
    export = ["review", "export", "--product", "widget", "--out", str(out)]
    assert main([*export, "--label", "false_alarm"]) == 0
    assert "2 false_alarm images" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == [
        f"{0:032x}.png",
        f"{1:032x}.png",
    ]
    assert main([*export, "--label", "defect"]) == 0
    assert [p.name for p in (out / "test" / "defect").iterdir()] == [f"{2:032x}.png"]
    with pytest.raises(SystemExit):  # argparse says which labels exist
        main([*export, "--label", "maybe"])
    assert "choose from 'defect', 'false_alarm'" in capsys.readouterr().err
