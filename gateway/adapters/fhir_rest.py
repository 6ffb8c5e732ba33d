"""The FHIR R4 sink: readings and alert transitions as transaction Bundles over HTTP(S).

Bundles are built by gateway/fhir_bundles.py (pure); this module posts them to the base URL
with a bearer token and reads the answer: 2xx advances the cursor; 4xx with an
OperationOutcome rejects the bundle (halved until the refused record is alone, then
quarantined with the server's diagnostics, adapters/delivery.py); 5xx, 408, 429, timeouts and
a refused token (401/403, other 4xx without an OperationOutcome) resend the same bundle after
a backoff or the server's Retry-After.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Final

import urllib3
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from gateway.adapters.delivery import (
    ACCEPTED,
    Answer,
    MessageSink,
    Outgoing,
    Pacing,
    PoisonCallback,
    Verdict,
    read_records,
)
from gateway.adapters.http_client import (
    check_secret_file,
    http_base_url,
    http_pool,
    read_secret_file,
)
from gateway.adapters.influx import retry_after_s
from gateway.adapters.mllp import DeviceMapFile, device_links
from gateway.errors import SinkError
from gateway.fhir_bundles import PATIENT_ID_SYSTEM_DEFAULT, outcome_reason, transaction_bundle
from gateway.hl7_messages import DeviceLink
from gateway.outbox import Outbox
from gateway.records import StoredRecord
from schemas.models import AlertTransition, Reading

SINK_NAME: Final = "fhir"
RETRYABLE_STATUSES: Final = frozenset({408, 429})
METRICS_REFRESH_S: Final = 600.0
"""A pump's DeviceMetrics (conditional updates, never referenced by its Observations) go with
its first Bundle and again after this long, not with every Bundle: 10 entries per pump."""
REASON_MAX_CHARS: Final = 500


class FhirSettings(BaseModel):
    """The [fhir] section; the token from PUMPGW_FHIR__TOKEN or an owner-only file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(description="FHIR R4 base URL, e.g. https://fhir.clinic.example/r4")
    token: SecretStr | None = Field(None, description="bearer token; better PUMPGW_FHIR__TOKEN")
    token_file: Path | None = Field(None, description="file holding the bearer token (mode 600)")
    records_per_bundle: int = Field(200, ge=1, le=5000, description="readings and alerts per POST")
    batch_rows: int = Field(2000, ge=1, le=100_000, description="outbox rows read at once")
    send_every_s: float = Field(1.0, ge=0, le=3600, description="pause after a busy drain")
    device_metrics: bool = Field(
        True, description="a DeviceMetric per quantity, per pump at start and every 10 minutes"
    )
    send_readings: bool = Field(True, description="Observations")
    send_alerts: bool = Field(True, description="DetectedIssues")
    device_map_file: DeviceMapFile = Field(
        None, description="JSON {pump_id: {patient_id, eui64}}: subject and Device identifiers"
    )
    patient_identifier_system: str = Field(
        PATIENT_ID_SYSTEM_DEFAULT, description="Identifier.system of mapped patient ids"
    )
    timeout_s: float = Field(10.0, gt=0, le=600, description="per request")
    verify_tls: bool = Field(True, description="verify the server certificate (https)")
    ca_file: Path | None = Field(None, description="CA bundle for a private CA (https)")
    retry_initial_s: float = Field(0.5, gt=0, description="first backoff after a failure")
    retry_max_s: float = Field(30.0, gt=0, description="backoff cap; also the refused pace")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        return http_base_url(
            value,
            example="http://host:port/path or https://host/path",
            credentials_go="the token in token/token_file",
        )

    @field_validator("token_file")
    @classmethod
    def _owner_only(cls, value: Path | None) -> Path | None:
        return check_secret_file(value)

    @model_validator(mode="after")
    def _consistent(self) -> FhirSettings:
        if self.token is not None and self.token_file is not None:
            raise ValueError("set fhir.token or fhir.token_file, not both")
        if self.retry_max_s < self.retry_initial_s:
            raise ValueError("retry_max_s must be at least retry_initial_s")
        return self

    def display_url(self) -> str:
        auth = "bearer token" if self.token or self.token_file else "no token"
        return f"{self.base_url} (transaction Bundles, {auth})"

    def pacing(self) -> Pacing:
        return Pacing(self.batch_rows, self.send_every_s, self.retry_initial_s, self.retry_max_s)


class FhirEncoder:
    """Outbox rows -> transaction Bundles of at most records_per_bundle records."""

    splittable = True  # halve a rejected bundle until the refused record is alone

    def __init__(self, settings: FhirSettings, links: Mapping[str, DeviceLink]) -> None:
        self._settings = settings
        self._links = links
        self._metrics_sent_m: dict[str, float] = {}

    def encode(self, rows: Sequence[StoredRecord]) -> list[Outgoing]:
        settings = self._settings
        chosen, broken = read_records(
            rows, readings=settings.send_readings, alerts=settings.send_alerts
        )
        size = self._settings.records_per_bundle
        return broken + [self._bundle(chosen[i : i + size]) for i in range(0, len(chosen), size)]

    def _bundle(self, part: list[tuple[StoredRecord, Reading | AlertTransition]]) -> Outgoing:
        records = [record for _, record in part]
        bundle = transaction_bundle(records, self._links, metrics_for=self._metrics_due(records))
        return Outgoing(tuple(row for row, _ in part), bundle.body, bundle.record_ids[0])

    def _metrics_due(self, records: Sequence[Reading | AlertTransition]) -> set[str]:
        """Pumps whose DeviceMetrics go in this Bundle; noted as sent (a refused Bundle is
        split and encoded again, so a pump may then wait METRICS_REFRESH_S)."""
        if not self._settings.device_metrics:
            return set()
        now_m = time.monotonic()
        due = {
            r.pump_id
            for r in records
            if now_m - self._metrics_sent_m.get(r.pump_id, -METRICS_REFRESH_S) >= METRICS_REFRESH_S
        }
        self._metrics_sent_m.update(dict.fromkeys(due, now_m))
        return due


def answer_for_status(status: int, body: bytes, retry_after: str | None, now_s: float) -> Answer:
    """The verdict of an HTTP answer to a transaction Bundle."""
    if 200 <= status <= 299:
        return ACCEPTED
    outcome = outcome_reason(body)
    text = outcome or body[:REASON_MAX_CHARS].decode("utf-8", "replace").strip() or "no body"
    reason = f"HTTP {status}: {text}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        return Answer(Verdict.RETRY, reason, retry_after_s(retry_after, now_s))
    if outcome is not None and status not in (401, 403):
        return Answer(Verdict.REJECTED, reason)
    # Credentials, a wrong base URL: a person must act; resend at the slowest pace.
    return Answer(Verdict.RETRY, f"{reason}; check fhir.base_url and the token")


class FhirTransport:
    """POST {base_url} with a transaction Bundle over urllib3 (no retries of its own)."""

    def __init__(self, settings: FhirSettings) -> None:
        self.url = settings.base_url
        try:
            token = read_secret_file(settings.token, settings.token_file)
        except (OSError, ValueError) as exc:
            raise SinkError(f"fhir.token_file: {exc}") from exc
        self._headers = {
            "Content-Type": "application/fhir+json; charset=utf-8",
            "Accept": "application/fhir+json",
            "Prefer": "return=minimal",
        }
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._retry_max_s = settings.retry_max_s
        self._pool = http_pool(settings.timeout_s, settings.verify_tls, settings.ca_file)

    def send(self, message: Outgoing) -> Answer:
        try:
            response = self._pool.request(
                "POST", self.url, body=message.body, headers=self._headers
            )
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            return Answer(Verdict.RETRY, f"cannot reach {self.url}: {exc}", connected=False)
        answer = answer_for_status(
            response.status, response.data, response.headers.get("Retry-After"), time.time()
        )
        if answer.verdict is Verdict.RETRY and "check fhir.base_url" in answer.reason:
            return Answer(Verdict.RETRY, answer.reason, self._retry_max_s)
        return answer

    def close(self) -> None:
        self._pool.clear()


def make_fhir_sink(
    settings: FhirSettings, outbox: Outbox, *, on_poison: PoisonCallback
) -> MessageSink:
    """The [fhir] sink, token and device map read now."""
    links = device_links(settings.device_map_file, settings.patient_identifier_system)
    encoder, transport = FhirEncoder(settings, links), FhirTransport(settings)
    return MessageSink(
        SINK_NAME, outbox, encoder, transport, settings.pacing(), on_poison=on_poison
    )
