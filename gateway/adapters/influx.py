"""The InfluxDB sink: drains the outbox's line protocol to InfluxDB v2 or v1 in batches.

v2 (InfluxDB 2.x, VictoriaMetrics, anything with /api/v2/write) and v1 (InfluxDB 1.x
/write?db=) are one POST each through urllib3, synchronously (never a client library's
background batching: influxdb-client's drops data after its retries, PEERS.md).
The outbox is the buffer; a batch is acknowledged there only after a 2xx.

Errors (third-party exceptions become these in `_mapped_errors` and `error_for_status`):

    InfluxError                  root
    ├── InfluxUnavailableError   retry with backoff, no limit: connection, timeout, 408, 429, 5xx
    ├── InfluxRejectedError      the server refused these points (400, 413, 422): bisect, poison
    │                            (InfluxDB's partial writes, e.g. beyond retention, are these)
    ├── InfluxRefusedError       a person must act (401, 403, 404, other 4xx): retry slowly
    └── InfluxConfigError        a secret file cannot be read at start
"""

from __future__ import annotations

import base64
import contextlib
import email.utils
import json
import logging
import random
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, Protocol
from urllib.parse import quote, urlencode

import urllib3
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.adapters.delivery import Pacing, SinkCore
from gateway.adapters.http_client import (
    check_secret_file,
    http_base_url,
    http_pool,
    read_secret_file,
)
from gateway.errors import SinkError, StoppedError
from gateway.outbox import Outbox
from gateway.records import StoredRecord

log = logging.getLogger(__name__)

SINK_NAME: Final = "influx"
GZIP_LEVEL: Final = 1
"""Level 1 compresses line protocol about 18x at ~500 MB/s; level 9 is 6x slower for 25 % less."""
WRITE_EVERY_S: Final = 1.0
"""After a write, rows gather this long before the next one (a full batch goes at once): one
request a second at a ward's pace instead of one per ingest commit (docs/performance.md)."""
RETRY_AFTER_MAX_S: Final = 600.0
"""A server's Retry-After is honoured up to this."""
REASON_MAX_CHARS: Final = 500
RETRYABLE_STATUSES: Final = frozenset({408, 429})
REJECTED_STATUSES: Final = frozenset({400, 413, 422})
VICTORIA_METRICS_AHEAD_S: Final = 2 * 86_400
"""VictoriaMetrics answers 204 yet ignores points more than two days ahead of its clock."""


# --- errors -------------------------------------------------------------------------------


class InfluxError(SinkError):
    """Root of the sink's errors; `status` is the HTTP status when there was an answer."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason if status is None else f"HTTP {status}: {reason}")
        self.reason = reason
        self.status = status


class InfluxUnavailableError(InfluxError):
    """Worth retrying: the server is unreachable, overloaded or failing for now."""

    def __init__(self, reason: str, status: int | None = None, retry_after_s: float | None = None):
        super().__init__(reason, status)
        self.retry_after_s = retry_after_s


class InfluxRejectedError(InfluxError):
    """The server refused the points themselves; resending them unchanged cannot succeed."""


class InfluxRefusedError(InfluxError):
    """The server refused the request (credentials, bucket, database): a person must act."""


class InfluxConfigError(InfluxError):
    """The sink cannot start: the message names the key and the file."""


def server_reason(body: bytes | str | None) -> str:
    """The server's error text: InfluxDB's JSON `error`/`message`, else the body itself."""
    if body is None:
        return "no response body"
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        decoded = json.loads(text)
        text = str(decoded.get("error") or decoded.get("message") or text)
    return text.strip()[:REASON_MAX_CHARS] or "empty response body"


def retry_after_s(value: str | None, now_s: float) -> float | None:
    """Seconds to wait from a Retry-After header (seconds or an HTTP date); None if absent."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - now_s
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S)


def error_for_status(
    status: int, body: bytes | str | None, headers: Mapping[str, str] | None, now_s: float
) -> InfluxError | None:
    """The error an HTTP answer means, or None for a 2xx."""
    if 200 <= status <= 299:
        return None
    reason = server_reason(body)
    if status >= 500 or status in RETRYABLE_STATUSES:
        after = retry_after_s((headers or {}).get("Retry-After"), now_s)
        return InfluxUnavailableError(reason, status, after)
    if status in REJECTED_STATUSES:
        return InfluxRejectedError(reason, status)
    return InfluxRefusedError(reason, status)


@contextlib.contextmanager
def _mapped_errors(url: str) -> Iterator[None]:
    """Turn transport failures (urllib3, sockets) into InfluxUnavailable."""
    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        raise InfluxUnavailableError(f"cannot reach {url}: {exc}") from exc
    except OSError as exc:
        raise InfluxUnavailableError(f"cannot reach {url}: {exc}") from exc


# --- configuration ------------------------------------------------------------------------


def read_secret(value: SecretStr | None, path: Path | None, key: str) -> str | None:
    """A secret from its setting (environment) or else its owner-only file."""
    try:
        return read_secret_file(value, path)
    except (OSError, ValueError) as exc:
        raise InfluxConfigError(f"influx.{key}: {exc}") from exc


class InfluxSettings(BaseModel):
    """The [influx] section; secrets from PUMPGW_INFLUX__TOKEN / __PASSWORD or owner-only files."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="base URL, e.g. http://127.0.0.1:8086")
    api: Literal["v1", "v2"] = Field("v2", description="v2: /api/v2/write; v1: /write?db=")
    org: str | None = Field(None, description="v2 organisation (required for v2)")
    bucket: str = Field("pumps", min_length=1, description="v2 bucket, or the v1 database")
    token: SecretStr | None = Field(None, description="API token; better PUMPGW_INFLUX__TOKEN")
    token_file: Path | None = Field(None, description="file holding the token (mode 600)")
    username: str | None = Field(None, description="v1 user (HTTP basic authentication)")
    password: SecretStr | None = Field(None, description="v1 password; PUMPGW_INFLUX__PASSWORD")
    password_file: Path | None = Field(None, description="file holding the v1 password (mode 600)")
    batch_size: int = Field(5000, ge=1, le=100_000, description="outbox rows per write request")
    timeout_s: float = Field(10.0, gt=0, le=600, description="per request")
    gzip: bool = Field(True, description="compress request bodies")
    verify_tls: bool = Field(True, description="verify the server certificate (https)")
    ca_file: Path | None = Field(None, description="CA bundle for a private CA (https)")
    retry_initial_s: float = Field(0.5, gt=0, description="first backoff after a failure")
    retry_max_s: float = Field(30.0, gt=0, description="backoff cap; also the auth-failure pace")
    max_point_ahead_s: float = Field(
        VICTORIA_METRICS_AHEAD_S - 3600,
        gt=0,
        description="a point later than this after the sink's clock is refused (quarantined), "
        "never sent: VictoriaMetrics answers 204 but drops points over two days ahead",
    )
    max_point_age_days: float | None = Field(
        None,
        gt=0,
        description="a point older than this is refused (quarantined), never sent: set it to the "
        "bucket's retention, which the database enforces by dropping points, sometimes with a 2xx",
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_base_url(
            value,
            example="http://host:port or https://host:port",
            credentials_go="credentials in token/password settings",
        )

    @field_validator("token_file", "password_file")
    @classmethod
    def _owner_only(cls, value: Path | None) -> Path | None:
        return check_secret_file(value)

    @model_validator(mode="after")
    def _consistent(self) -> InfluxSettings:
        if self.api == "v2" and not self.org:
            raise ValueError("org is required when api = 'v2'")
        has_password = self.password is not None or self.password_file is not None
        if has_password and not self.username:
            raise ValueError("password needs username")
        if self.username and self.api == "v2":
            raise ValueError("username/password are for api = 'v1'; v2 uses a token")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        return self

    def display_url(self) -> str:
        """Where points go, without secrets."""
        target = f"org {self.org}, bucket" if self.api == "v2" else "database"
        return f"{self.url} ({self.api}, {target} {self.bucket})"


# --- transports ---------------------------------------------------------------------------


class Transport(Protocol):
    """Posts one encoded body (see encode_body); raises an InfluxError unless the answer is 2xx."""

    def post(self, body: bytes) -> None: ...

    def close(self) -> None: ...


def encode_body(points: Sequence[StoredRecord], gzip: bool) -> bytes:
    """The request body for points: their lines joined by newlines, gzipped if asked."""
    body = b"\n".join([p.line for p in points if p.line is not None])
    return zlib.compress(body, GZIP_LEVEL, wbits=31) if gzip else body  # wbits=31: gzip


class HttpTransport:
    """POST the line protocol to one write URL over urllib3, synchronously.

    Both APIs are this one request: v1 `/write?db=&precision=n` (InfluxDB 1.x), v2
    `/api/v2/write?org=&bucket=&precision=ns` (InfluxDB 2.x, VictoriaMetrics). Not
    influxdb-client: importing it costs 18 MB of resident memory (28 % of the station
    gateway's whole budget, docs/performance.md), and its synchronous WriteService sent
    exactly this request, headers included.
    """

    def __init__(self, settings: InfluxSettings, url: str, authorization: str | None) -> None:
        self.url = url
        self._headers = {"Content-Type": "text/plain; charset=utf-8"}
        if settings.gzip:
            self._headers["Content-Encoding"] = "gzip"
        if authorization is not None:
            self._headers["Authorization"] = authorization
        self._pool = http_pool(settings.timeout_s, settings.verify_tls, settings.ca_file)

    def post(self, body: bytes) -> None:
        with _mapped_errors(self.url):
            answer = self._pool.request("POST", self.url, body=body, headers=self._headers)
        error = error_for_status(answer.status, answer.data, answer.headers, time.time())
        if error is not None:
            raise error

    def close(self) -> None:
        self._pool.clear()


def make_transport(settings: InfluxSettings) -> Transport:
    """The transport for the configured API, with its secrets read now."""
    token = read_secret(settings.token, settings.token_file, "token_file")
    if settings.api == "v2":
        query = urlencode({"org": settings.org or "", "bucket": settings.bucket, "precision": "ns"})
        url = f"{settings.url}/api/v2/write?{query}"
        return HttpTransport(settings, url, f"Token {token}" if token else None)
    password = read_secret(settings.password, settings.password_file, "password_file")
    url = f"{settings.url}/write?db={quote(settings.bucket, safe='')}&precision=n"
    authorization = None
    if token is not None:
        authorization = f"Token {token}"
    elif settings.username is not None:
        pair = f"{settings.username}:{password or ''}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode()
    return HttpTransport(settings, url, authorization)


# --- the sink -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """Outbox rows read together: the points among them and their encoded request body, and
    the points the database would drop unseen (refused here, with the reason)."""

    rows: int
    last_seq: int
    points: list[StoredRecord]
    body: bytes
    refused: list[tuple[StoredRecord, str]]


def line_time_ns(line: bytes) -> int | None:
    """The timestamp at the end of a line protocol point, or None without one."""
    last = line.rstrip().rsplit(b" ", 1)[-1]
    return int(last) if last.isdigit() else None


def storable_problem(line: bytes, now_s: float, settings: InfluxSettings) -> str | None:
    """Why the database would drop this point while answering 2xx, or None if it keeps it."""
    at_ns = line_time_ns(line)
    if at_ns is None:
        return None
    at_s = at_ns / 1e9
    if at_s > now_s + settings.max_point_ahead_s:
        return (
            f"point time {at_s:.0f} s is more than influx.max_point_ahead_s "
            f"{settings.max_point_ahead_s:.0f} after this clock ({now_s:.0f} s): the database "
            "would answer 2xx and not store it"
        )
    if (
        settings.max_point_age_days is not None
        and at_s < now_s - settings.max_point_age_days * 86_400
    ):
        return (
            f"point time {at_s:.0f} s is older than influx.max_point_age_days "
            f"{settings.max_point_age_days:g} (the bucket's retention): the database would drop it"
        )
    return None


PoisonCallback = Callable[[StoredRecord, str], None]


class InfluxSink(SinkCore):
    """Drains the outbox to InfluxDB: batches, backoff without limit, bisection of rejects."""

    sends_key = "batches"

    def __init__(
        self,
        settings: InfluxSettings,
        outbox: Outbox,
        *,
        on_poison: PoisonCallback,
        name: str = SINK_NAME,
        transport: Transport | None = None,
        rng: random.Random | None = None,
    ) -> None:
        pacing = Pacing(
            settings.batch_size, WRITE_EVERY_S, settings.retry_initial_s, settings.retry_max_s
        )
        super().__init__(name, outbox, pacing, rng)
        self.settings = settings
        self._on_poison = on_poison
        self._transport = transport if transport is not None else make_transport(settings)
        self._executor: ThreadPoolExecutor | None = None

    # -- life cycle ------------------------------------------------------------------------

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Drain until `stop` is set, at most every WRITE_EVERY_S unless batches are full."""
        if not self.settings.verify_tls:
            log.warning(
                "influx.verify_tls is off: the server's certificate is NOT verified, so anyone "
                "on the network path can pose as %s and receive the token",
                self.settings.display_url(),
            )
        super().run(stop, wake)

    def _release(self) -> None:
        """Stop the read-ahead thread and release the HTTP connections."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
        self._transport.close()

    # -- draining --------------------------------------------------------------------------

    def drain(self, stop: threading.Event) -> int:
        """Deliver every pending batch, reading the next while this one is written; return rows."""
        delivered = 0
        batch = self._prepare(self.sent_up_to)
        while batch is not None and not stop.is_set():
            upcoming: Future[Batch | None] | None = None
            if batch.rows == self.settings.batch_size:  # a full batch: more may be waiting
                upcoming = self._reader().submit(self._prepare, batch.last_seq)
            self._deliver_batch(batch, stop)
            delivered += batch.rows
            batch = upcoming.result() if upcoming is not None else None
        return delivered

    def drain_once(self, stop: threading.Event) -> int:
        """Deliver one batch of rows after `sent_up_to`; return how many rows it covered."""
        batch = self._prepare(self.sent_up_to)
        if batch is None:
            return 0
        self._deliver_batch(batch, stop)
        return batch.rows

    def _reader(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-read-ahead")
        return self._executor

    def _prepare(self, after_seq: int) -> Batch | None:
        """Read the rows after `after_seq` and encode their points into one request body."""
        rows = self._outbox.read_lines(self.name, after_seq, self.settings.batch_size)
        if not rows:
            return None
        now_s = time.time()
        points: list[StoredRecord] = []
        refused: list[tuple[StoredRecord, str]] = []
        for row in rows:
            if row.line is None:
                continue
            problem = storable_problem(row.line, now_s, self.settings)
            if problem is None:
                points.append(row)
            else:
                refused.append((row, problem))
        body = encode_body(points, self.settings.gzip) if points else b""
        return Batch(len(rows), rows[-1].seq, points, body, refused)

    def _deliver_batch(self, batch: Batch, stop: threading.Event) -> None:
        if batch.points:
            try:
                self._post_until_answered(batch.body, len(batch.points), stop)
            except InfluxRejectedError:
                self._bisect(batch.points, stop)
        # After the rest is written: refusing moves the cursor past the refused point.
        for record, problem in batch.refused:
            self._poison(record, InfluxRejectedError(problem))
        self._acknowledge(batch.last_seq)

    def _deliver(self, points: list[StoredRecord], stop: threading.Event) -> None:
        """Write points, retrying until written; isolate rejected points by halving."""
        body = encode_body(points, self.settings.gzip)
        try:
            self._post_until_answered(body, len(points), stop)
        except InfluxRejectedError as exc:
            if len(points) == 1:
                self._poison(points[0], exc)
                return
            self._bisect(points, stop)

    def _bisect(self, points: list[StoredRecord], stop: threading.Event) -> None:
        middle = len(points) // 2
        self._deliver(points[:middle], stop)
        self._acknowledge(points[middle - 1].seq)
        self._deliver(points[middle:], stop)

    def _post_until_answered(self, body: bytes, points: int, stop: threading.Event) -> None:
        """Post until a 2xx (return) or a rejection (raise InfluxRejectedError); retry the rest."""
        while True:
            if stop.is_set():
                raise StoppedError
            try:
                self._transport.post(body)
            except InfluxUnavailableError as exc:
                self._retry_later(exc, stop, exc.retry_after_s)
            except InfluxRefusedError as exc:
                self._quiet.error(
                    "refused",
                    "InfluxDB refused the writes (%s); check the token, user, org and "
                    "bucket/database. Retrying every %.0f s; nothing is dropped.",
                    exc,
                    self.settings.retry_max_s,
                )
                self._retry_later(exc, stop, self.settings.retry_max_s)
            except InfluxRejectedError as exc:
                self._note_answer(error=str(exc))
                raise
            else:
                self._note_sent(points)
                return

    def _retry_later(self, exc: InfluxError, stop: threading.Event, wait_s: float | None) -> None:
        """Note the failure and wait: `wait_s`, or the next backoff step when None."""
        if not isinstance(exc, InfluxRefusedError):
            self._quiet.warning(
                "unavailable", "InfluxDB unavailable (%s); retrying with backoff", exc
            )
        self._wait_then_retry(stop, str(exc), connected=False, wait_s=wait_s)

    def _poison(self, record: StoredRecord, exc: InfluxError) -> None:
        reason = str(exc)  # "HTTP 400: <the server's reason>"
        self._quiet.warning(
            "poison", "InfluxDB rejected record %s for good: %s", record.record_id, reason
        )
        self._note_poisoned(1)
        self._on_poison(record, reason)
        self._acknowledge(record.seq)

    # -- health ----------------------------------------------------------------------------

    def _on_resumed(self) -> None:
        log.info("InfluxDB writes resumed after %d retries", self._attempt)
        self._quiet.forget("unavailable")
        self._quiet.forget("refused")

    def _gauges(self) -> dict[str, int]:
        return {"sent_up_to": self.sent_up_to}
