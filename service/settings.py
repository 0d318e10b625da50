"""Every setting of the service, read from the environment (documented in the README)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from service.media import KeepImages

# What a product name may look like: it names a folder and Redis keys, so nothing
# that could walk a path or break a key.
PRODUCT_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"


class Settings(BaseSettings):
    """The service's settings; each field is the upper-case environment variable."""

    # Errors never repeat a value: DATABASE_URL, MQTT_URL and API_KEY hold secrets.
    model_config = SettingsConfigDict(frozen=True, extra="ignore", hide_input_in_errors=True)

    # Queue backend: Redis Streams when set, else one process with an in-memory queue.
    redis_url: str | None = None
    key_prefix: str = Field("glad", pattern=r"^[A-Za-z0-9_.:-]{1,64}$")

    # Worker side.
    model_dir: Path = Path("models")
    device: str = "cpu"
    # Run each product's denoiser and feature extractor compiled at fixed batch sizes
    # (CUDA graphs on a GPU), captured at load before the product is announced.
    # None: on with CUDA, off on the CPU (where compiling takes minutes and gains little).
    compile: bool | None = None
    max_batch: int = Field(8, ge=1, le=256)
    max_wait_ms: int = Field(10, ge=0, le=10_000)
    max_deliveries: int = Field(3, ge=1)
    heartbeat_ttl_s: float = Field(10.0, gt=0.5)
    reload_interval_s: float = Field(5.0, gt=0.0)
    worker_metrics_port: int = Field(9100, ge=0, le=65535)
    # `glad worker` runs at this nice value: where it shares CPUs with an API process, the
    # API's cheap answers (429s, errors, health) do not wait behind inference.
    worker_nice: int = Field(10, ge=0, le=19)

    # Batches a worker runs at once, each on its own inference thread. None: one where the
    # models are compiled (their captured buffers serve one batch at a time), else two.
    inference_lanes: int | None = Field(None, ge=1, le=16)

    @property
    def compiled(self) -> bool:
        """Whether workers compile their models (COMPILE, or its default for the device)."""
        return self.device.startswith("cuda") if self.compile is None else self.compile

    @property
    def lanes(self) -> int:
        """Batches a worker runs at once (INFERENCE_LANES, or its default)."""
        if self.inference_lanes is not None:
            return self.inference_lanes
        return 1 if self.compiled else 2

    @model_validator(mode="after")
    def _one_lane_when_compiled(self) -> Settings:
        if self.compiled and self.lanes > 1:
            raise ValueError(
                "INFERENCE_LANES above 1 needs COMPILE=0: a compiled model runs one batch at a time"
            )
        return self

    # API side.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_workers: int = Field(1, ge=1, le=64)
    request_timeout_s: float = Field(30.0, gt=0.0)
    max_queue: int = Field(64, ge=1)
    retry_after_s: int = Field(1, ge=1)
    max_image_bytes: int = Field(20 * 1024 * 1024, ge=1024)
    max_pixels: int = Field(40_000_000, ge=1024)
    # A request body must arrive within this long; a stalled upload is answered 408.
    body_timeout_s: float = Field(10.0, gt=0.0)
    # Open connections one API process serves at once; more are answered 503 at once.
    max_connections: int = Field(512, ge=1)
    # Heatmaps are drawn at the input's size, scaled down to at most this many pixels on
    # the longest side: a 6000 px image's full-size overlay costs seconds and megabytes.
    heatmap_max_side: int = Field(1024, ge=64)
    # Redis mode: how long the API keeps a served product's live workers before asking
    # Redis again (service.presence.CachedPresenceBoard); 0 asks on every request.
    presence_cache_s: float = Field(1.0, ge=0.0, le=60.0)
    # The record of every answered inspection (service.records). DATABASE_URL is an
    # SQLAlchemy URL (postgresql+psycopg://... in Redis mode); without it, embedded mode
    # keeps an SQLite file under DATA_DIR and Redis mode records nothing.
    record: bool = True
    database_url: SecretStr | None = None
    data_dir: Path = Path("data")
    keep_images: KeepImages = KeepImages.anomalous
    image_max_age_days: float = Field(30.0, gt=0.0)
    image_max_mib: float = Field(10240.0, gt=0.0)
    record_buffer: int = Field(10_000, ge=1)
    # Verdicts on the plant's bus (service.verdicts): mqtt://[user:password@]host[:port]
    # (mqtts:// for TLS); unset publishes nothing. Topic: <MQTT_TOPIC_PREFIX>/<product>/verdict.
    mqtt_url: SecretStr | None = None
    mqtt_topic_prefix: str = Field("glad", pattern=r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
    # At most paho's message ids: one per verdict awaiting its acknowledgement.
    mqtt_outbox: int = Field(10_000, ge=1, le=65_535)
    api_key: SecretStr | None = None
    # With API_KEY: whether /products and /metrics need it too (Prometheus can send it).
    api_key_reads: bool = False
    log_level: str = "info"

    @field_validator("mqtt_url")
    @classmethod
    def _mqtt_url(cls, url: SecretStr | None) -> SecretStr | None:
        if url is None or not url.get_secret_value():
            return None  # unset, or MQTT_URL= in an .env file
        parts = urlsplit(url.get_secret_value())
        wrong = ValueError(
            "MQTT_URL must look like mqtt://[user:password@]host[:port] (mqtts:// for TLS)"
        )
        try:
            port = parts.port
        except ValueError:
            raise wrong from None
        if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname or port == 0:
            raise wrong
        return url

    @property
    def embedded(self) -> bool:
        """True when API and worker share one process and an in-memory queue."""
        return not self.redis_url

    @property
    def database(self) -> str:
        """The records' database: DATABASE_URL, or the SQLite file under DATA_DIR."""
        if self.database_url is not None:
            return self.database_url.get_secret_value()
        return f"sqlite:///{(self.data_dir / 'inspections.db').resolve()}"

    @property
    def media_dir(self) -> Path:
        """Where kept images and heatmaps go."""
        return self.data_dir / "media"

    @property
    def record_url(self) -> str | None:
        """Where inspections are recorded; None: nowhere."""
        if not self.record or (self.database_url is None and not self.embedded):
            return None
        return self.database
