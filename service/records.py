"""The record of every answered inspection: its table, and the store that writes, queries
and reviews it (SQLAlchemy 2; SQLite in embedded mode, PostgreSQL in Redis mode).

The store is synchronous: the API calls it on a thread (service.recorder writes off the
request path; service.history's queries run through asyncio.to_thread)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Boolean,
    DateTime,
    Engine,
    Float,
    Integer,
    String,
    create_engine,
    event,
    func,
    select,
    update,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

log = logging.getLogger(__name__)

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
# The longest part, camera or line id a caller may give.
MAX_IDENTITY_LENGTH = 128
MAX_NOTE_LENGTH = 2000
MAX_REVIEWER_LENGTH = 64
# Printable text, no control characters (which a log line, a CSV cell or a bus message
# would carry on): a part's identity, a reviewer.
PRINTABLE = r"^[^\x00-\x1f\x7f]+$"


class ReviewLabel(StrEnum):
    defect = "defect"
    false_alarm = "false_alarm"


class Base(DeclarativeBase):
    pass


class InspectionRow(Base):
    """One answered inspection. The image and the heatmap live in files (service.media);
    the row names them, relative to the media folder, and says when they expired."""

    __tablename__ = "inspections"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    request_id: Mapped[str] = mapped_column(String(64), index=True)
    time: Mapped[datetime] = mapped_column(DateTime, index=True)
    product: Mapped[str] = mapped_column(String(64), index=True)
    model_version: Mapped[str] = mapped_column(String(64))
    score: Mapped[float] = mapped_column(Float)
    raw_score: Mapped[float] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    is_anomalous: Mapped[bool] = mapped_column(Boolean, index=True)
    denoise_step: Mapped[int] = mapped_column(Integer)
    queue_wait_s: Mapped[float] = mapped_column(Float)
    inference_s: Mapped[float] = mapped_column(Float)
    total_s: Mapped[float] = mapped_column(Float)
    part_id: Mapped[str | None] = mapped_column(String(MAX_IDENTITY_LENGTH), index=True)
    camera_id: Mapped[str | None] = mapped_column(String(MAX_IDENTITY_LENGTH))
    line_id: Mapped[str | None] = mapped_column(String(MAX_IDENTITY_LENGTH))
    image_path: Mapped[str | None] = mapped_column(String(255))
    heatmap_path: Mapped[str | None] = mapped_column(String(255))
    media_expired: Mapped[bool] = mapped_column(Boolean, default=False)
    review_label: Mapped[str | None] = mapped_column(String(16), index=True)
    review_note: Mapped[str | None] = mapped_column(String(MAX_NOTE_LENGTH))
    reviewed_by: Mapped[str | None] = mapped_column(String(MAX_REVIEWER_LENGTH))
    reviewed_at: Mapped[datetime | None] = mapped_column(DateTime)


# Every column, in the order of the CSV export and of the JSON record.
COLUMNS = tuple(column.name for column in InspectionRow.__table__.columns)


@dataclass(frozen=True)
class Filters:
    """What GET /inspections selects; None: any."""

    product: str | None = None
    anomalous: bool | None = None
    since: datetime | None = None
    until: datetime | None = None
    part_id: str | None = None
    reviewed: bool | None = None
    label: ReviewLabel | None = None


def _sqlite_pragmas(connection, _record) -> None:  # noqa: ANN001 (DBAPI objects)
    # WAL: readers never wait for the writer; a busy file is waited for, not failed.
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def stored_time(moment: datetime) -> datetime:
    """A time as the table keeps it: UTC without its zone, the same on SQLite and
    PostgreSQL."""
    if moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def read_time(moment: datetime) -> datetime:
    """A time from the table, in UTC with its zone."""
    return moment.replace(tzinfo=UTC)


class RecordStore:
    """The inspections table on one database."""

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite"):
            database = url.split("///", 1)[-1]
            if database and database != ":memory:":
                Path(database).parent.mkdir(parents=True, exist_ok=True)
        # pool_pre_ping: a connection that died with the database is replaced, not used.
        self.engine: Engine = create_engine(url, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)

    def migrate(self) -> None:
        """Brings the schema to the newest migration (Alembic)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def write(self, rows: Sequence[dict[str, object]]) -> None:
        """Inserts records; one already there (a retry after a lost commit) is left as is."""
        with Session(self.engine) as session, session.begin():
            ids = [row["id"] for row in rows]
            known = select(InspectionRow.id).where(InspectionRow.id.in_(ids))
            present = set(session.scalars(known))
            session.add_all(InspectionRow(**row) for row in rows if row["id"] not in present)

    def get(self, record_id: str) -> InspectionRow | None:
        with Session(self.engine) as session:
            return session.get(InspectionRow, record_id)

    def query(self, filters: Filters, limit: int, offset: int) -> tuple[list[InspectionRow], int]:
        """A page of the records that match, newest first, and how many match in all."""
        wanted = _where(filters)
        with Session(self.engine) as session:
            total = session.scalar(select(func.count()).select_from(InspectionRow).where(*wanted))
            rows = session.scalars(
                select(InspectionRow)
                .where(*wanted)
                .order_by(InspectionRow.time.desc(), InspectionRow.id.desc())
                .limit(limit)
                .offset(offset)
            ).all()
        return list(rows), int(total or 0)

    def review(
        self, record_id: str, label: ReviewLabel, note: str, reviewer: str
    ) -> InspectionRow | None:
        """Labels a record (a later review replaces an earlier one); None if no such record."""
        with Session(self.engine, expire_on_commit=False) as session, session.begin():
            row = session.get(InspectionRow, record_id)
            if row is None:
                return None
            row.review_label = label.value
            row.review_note = note or None
            row.reviewed_by = reviewer
            row.reviewed_at = stored_time(datetime.now(UTC))
        return row

    def expire_media(self, paths: Iterable[str]) -> int:
        """Marks the records whose image or heatmap file was removed; returns how many."""
        paths = list(paths)
        if not paths:
            return 0
        with Session(self.engine) as session, session.begin():
            done = session.execute(
                update(InspectionRow)
                .where(InspectionRow.image_path.in_(paths) | InspectionRow.heatmap_path.in_(paths))
                .values(media_expired=True)
            )
        return done.rowcount or 0

    def close(self) -> None:
        self.engine.dispose()


def _where(filters: Filters) -> list:
    table = InspectionRow
    wanted = []
    if filters.product is not None:
        wanted.append(table.product == filters.product)
    if filters.anomalous is not None:
        wanted.append(table.is_anomalous == filters.anomalous)
    if filters.since is not None:
        wanted.append(table.time >= stored_time(filters.since))
    if filters.until is not None:
        wanted.append(table.time < stored_time(filters.until))
    if filters.part_id is not None:
        wanted.append(table.part_id == filters.part_id)
    if filters.reviewed is not None:
        label = table.review_label
        wanted.append(label.is_not(None) if filters.reviewed else label.is_(None))
    if filters.label is not None:
        wanted.append(table.review_label == filters.label.value)
    return wanted
