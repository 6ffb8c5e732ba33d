"""The one MQTT client seam: paho built from `[mqtt]`, paho's codes mapped here, typed events out.

Every MQTT client of the gateway goes through `MqttClient`: the station's sink, the ingest
worker's shared subscription, `pumpgw tail` and the demo operator. It builds the paho client
from the settings (URL, MQTT 5 or 3.1.1, TLS, credentials from the setting, the environment
or a file, session expiry), turns paho's return codes, reason codes and exceptions into ours
at this one place, and hands its owner typed events (`Connected`, `Refused`, `Unreachable`,
`Disconnected`, `Published`, `Subscribed`, `Unsubscribed`) instead of paho's callbacks.

Two ways to run it. `start()` gives the connection to paho's own network thread: paho's
callbacks then run there, and the owner's `emit` must only hand the event over (a queue, an
event) and tolerate being called twice. `start(in_caller=True)` keeps every byte on the
owner's thread: the owner calls `poll()` in its loop, which waits in one `select` for the
broker's socket or a `SelectableEvent` raised by another thread, reads and writes with
paho's `loop_read`/`loop_write`/`loop_misc`, and reconnects with backoff; callbacks then run
inside `poll()` and `publish()` writes at once, so a record costs no thread hand-off (the
station's sink, docs/performance.md). Two hooks run where paho needs their answer:
`before_connect` (the will of this connection) and `on_connect` (subscriptions and the
birth, sent before any queued publish).

Errors::

    MqttError                  anything the MQTT adapters report (a SinkError)
     ├── MqttConfigError       settings that cannot work (password file, TLS files)
     └── MqttRefusedError      the broker said no: reason_code, topic (None: CONNECT)
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import ssl
import stat
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.exception import MQTTException
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway.errors import SinkError
from gateway.topics import DEFAULT_PREFIX, segment_problem

log = logging.getLogger(__name__)

RECONNECT_MIN_DELAY_S: Final = 1
SERVER_RECEIVE_MAX: Final = 65_535
"""MQTT 5: the broker's Receive Maximum when its CONNACK names none."""
SCHEMES: Final = {"mqtt": 1883, "mqtts": 8883}


# --- errors -------------------------------------------------------------------------------


class MqttError(SinkError):
    """Something this adapter cannot do; the message says what to check."""


class MqttConfigError(MqttError):
    """The settings cannot work (unreadable password file, bad TLS files)."""


class MqttRefusedError(MqttError):
    """The broker refused a CONNECT (topic None) or a PUBLISH to `topic`."""

    def __init__(self, message: str, reason_code: int, topic: str | None = None) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.topic = topic


# --- settings ---------------------------------------------------------------------------


class MqttTls(BaseModel):
    """`[mqtt.tls]`: files for an mqtts:// broker; the system CAs are used without ca_file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ca_file: Path | None = Field(None, description="PEM CA bundle that signed the broker")
    cert_file: Path | None = Field(None, description="PEM client certificate (mutual TLS)")
    key_file: Path | None = Field(None, description="PEM key of cert_file")
    insecure_skip_verify: bool = Field(
        False, description="do not verify the broker's certificate (tests only; warns at start)"
    )

    @field_validator("ca_file", "cert_file", "key_file")
    @classmethod
    def _usable_path(cls, value: Path | None) -> Path | None:
        if value is not None and "\0" in str(value):
            raise ValueError("the path contains a NUL byte; no file can have that name")
        return value

    @model_validator(mode="after")
    def _key_needs_cert(self) -> MqttTls:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file")
        return self

    @property
    def configured(self) -> bool:
        return self != MqttTls()


class MqttSettings(BaseModel):
    """`[mqtt]`: the broker, credentials, TLS, the delivery window and the topic prefix."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field("mqtt://localhost:1883", description="mqtt://host:port or mqtts://host:port")
    protocol: Literal["5", "3.1.1"] = Field("5", description='"5" (default) or "3.1.1"')
    client_id: str | None = Field(None, description="default: pumpgw-{site}-{station}")
    username: str | None = None
    password: SecretStr | None = Field(None, description="or env PUMPGW_MQTT__PASSWORD")
    password_file: Path | None = Field(None, description="file holding the password, mode 600")
    tls: MqttTls = MqttTls()
    keepalive_s: int = Field(30, ge=5, le=65_535)
    inflight_max: int = Field(
        1000, ge=1, le=65_535, description="records published and not yet acknowledged"
    )
    replay_rate_per_s: float = Field(2000.0, gt=0, description="publish rate of a backlog")
    historical_after_s: float = Field(
        5.0, ge=0, description="rows older than this when published are flagged historical"
    )
    reconnect_max_s: int = Field(30, ge=1, le=3600, description="reconnect backoff ceiling")
    session_expiry_s: int = Field(
        86_400,
        ge=0,
        le=4_294_967_294,
        description="how long the broker keeps this gateway's session while it is away, so "
        "acknowledgements published meanwhile are applied when it returns; 0: a fresh session "
        "at each connect (MQTT 3.1.1 keeps a session without expiry when this is above 0)",
    )
    topic_prefix: str = Field(DEFAULT_PREFIX, description="first topic level")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) else value

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        parts = urllib.parse.urlsplit(value)
        if parts.scheme not in SCHEMES:
            raise ValueError("use mqtt://host:port or mqtts://host:port")
        if parts.username is not None or parts.password is not None:
            raise ValueError("put credentials in mqtt.username and mqtt.password, not in the url")
        if not parts.hostname or parts.path not in ("", "/") or parts.query:
            raise ValueError("use mqtt://host:port (a host, an optional port, nothing else)")
        try:
            parts.port  # noqa: B018 - urlsplit checks the port only when it is read
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from exc
        return value

    @field_validator("topic_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        problem = segment_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @field_validator("password_file")
    @classmethod
    def _private_file(cls, value: Path | None) -> Path | None:
        problem = None if value is None else _private_file_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> MqttSettings:
        if self.password is not None and self.password_file is not None:
            raise ValueError("set mqtt.password or mqtt.password_file, not both")
        if self.tls.configured and not self.uses_tls:
            raise ValueError("mqtt.tls is set but the url is mqtt://; use mqtts://")
        return self

    @property
    def uses_tls(self) -> bool:
        return self.url.startswith("mqtts://")

    @property
    def host(self) -> str:
        return urllib.parse.urlsplit(self.url).hostname or ""

    @property
    def port(self) -> int:
        parts = urllib.parse.urlsplit(self.url)
        return parts.port or SCHEMES[parts.scheme]

    def display_url(self) -> str:
        """The broker address for logs and screens (never credentials)."""
        return f"{'mqtts' if self.uses_tls else 'mqtt'}://{self.host}:{self.port}"

    def password_value(self) -> str | None:
        """The password from the setting, the environment or password_file."""
        if self.password is not None:
            return self.password.get_secret_value()
        if self.password_file is None:
            return None
        problem = _private_file_problem(self.password_file)
        if problem is not None:
            raise MqttConfigError(f"mqtt.password_file: {problem}")
        try:
            return self.password_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise MqttConfigError(f"mqtt.password_file: cannot read it: {exc.strerror}") from exc


def _private_file_problem(path: Path) -> str | None:
    """Why a secret file must not be used (missing, or open to group/others), or None."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror}"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is readable by group or others; run: chmod 600 {path}"
    return None


# --- the paho seam: paho's return codes, reason codes and exceptions become ours here ---

CONNECT_HINTS: Final = {
    0x84: 'the broker does not speak this MQTT version; try mqtt.protocol = "3.1.1"',
    0x85: "the broker rejected the client id; set mqtt.client_id",
    0x86: "check mqtt.username and the password (PUMPGW_MQTT__PASSWORD or mqtt.password_file)",
    0x87: "check mqtt.username, the password and the broker's ACL for this user",
    0x88: "the broker is unavailable; retrying",
    0x89: "the broker is busy; retrying",
    0x8A: "this client is banned by the broker; ask its administrator",
    0x8C: "the broker wants another authentication method",
}


def connect_refusal(code: int, name: str, url: str) -> MqttRefusedError:
    """A refused CONNACK as our error, with what to do about it."""
    hint = CONNECT_HINTS.get(code, "see the broker's log")
    message = f"broker {url} refused the connection: {name} (0x{code:02X}); {hint}"
    return MqttRefusedError(message, code)


def publish_problem(rc: MQTTErrorCode) -> str | None:
    """Why publish() did not take a message for sending (None: it did; still not delivered)."""
    if rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
        return None
    if rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
        return "not connected"
    if rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
        return "paho's queue is full"
    return mqtt.error_string(rc)


def reason(code: ReasonCode) -> tuple[int, str]:
    """The numeric value and name of a paho reason code (3.1.1 codes arrive converted)."""
    return code.value, code.getName()


@contextlib.contextmanager
def paho_errors(what: str, error: type[MqttError] = MqttError) -> Iterator[None]:
    """Raise paho's and ssl's exceptions during `what` as `error`."""
    try:
        yield
    except (ValueError, OSError, RuntimeError, ssl.SSLError, MQTTException) as exc:
        raise error(f"{what}: {exc}") from exc


def no_delay(client: mqtt.Client) -> None:
    """Turn Nagle's algorithm off on paho's socket (paho leaves it on).

    With it on, a small PUBLISH waits while earlier bytes are unacknowledged: at 1,000
    records/s that added tens of milliseconds per record (docs/performance.md).
    """
    sock = client.socket()
    setsockopt = getattr(sock, "setsockopt", None)
    if setsockopt is not None:
        with contextlib.suppress(OSError):
            setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def user_properties(props: Properties | None) -> tuple[tuple[str, str], ...]:
    """MQTT 5 user properties of a received message (empty for 3.1.1)."""
    pairs = getattr(props, "UserProperty", None) or []
    return tuple((str(k), str(v)) for k, v in pairs)


def set_tls(client: mqtt.Client, tls: MqttTls) -> None:
    """TLS from `[mqtt.tls]`; unreadable or bad files raise MqttConfigError."""
    with paho_errors("mqtt.tls", MqttConfigError):
        client.tls_set(
            ca_certs=str(tls.ca_file) if tls.ca_file else None,
            certfile=str(tls.cert_file) if tls.cert_file else None,
            keyfile=str(tls.key_file) if tls.key_file else None,
            cert_reqs=ssl.CERT_NONE if tls.insecure_skip_verify else ssl.CERT_REQUIRED,
        )
        client.tls_insecure_set(tls.insecure_skip_verify)


# --- PUBLISH properties ------------------------------------------------------------------


PUBLISH_PROPERTIES_HEAD: Final = (
    b"\x01\x01"  # payload format indicator: UTF-8
    + b"\x03" + len(b"application/json").to_bytes(2, "big") + b"application/json"
)
"""The PUBLISH properties every record carries, encoded once (MQTT 5.0, 2.2.2.2)."""
USER_PROPERTY_ID: Final = 0x26


def _utf8(text: str) -> bytes:
    data = text.encode()
    return len(data).to_bytes(2, "big") + data


def _variable_byte_integer(value: int) -> bytes:
    out = bytearray()
    while True:
        value, digit = divmod(value, 128)
        out.append(digit | (0x80 if value else 0))
        if not value:
            return bytes(out)


class PackedProperties(Properties):
    """PUBLISH properties encoded once, here: JSON content type and user properties.

    paho's own Properties validates every attribute through linear scans and builds two
    dicts per instance: 55 us per record against 3 us here, about half of paho's CPU per
    QoS 1 message; paho's public API has no way to hand it encoded bytes, so this is the
    one subclass of a paho type, kept at this seam (docs/performance.md, "Why
    PackedProperties stays"). paho only calls pack() on the properties of an outgoing
    PUBLISH; the bytes are the same (tests/unit/test_mqtt_properties.py compares them).
    """

    PayloadFormatIndicator: int
    ContentType: str
    UserProperty: list[tuple[str, str]]
    _packed: bytes

    def __init__(self, user_properties: list[tuple[str, str]]) -> None:
        # Properties.__init__ is skipped on purpose (it is the cost); so is its __setattr__.
        body = PUBLISH_PROPERTIES_HEAD + b"".join(
            bytes((USER_PROPERTY_ID,)) + _utf8(key) + _utf8(value)
            for key, value in user_properties
        )
        for name, value in (
            ("packetType", PacketTypes.PUBLISH),
            ("PayloadFormatIndicator", 1),
            ("ContentType", "application/json"),
            ("UserProperty", list(user_properties)),
            ("_packed", _variable_byte_integer(len(body)) + body),
        ):
            object.__setattr__(self, name, value)

    def pack(self) -> bytes:
        return self._packed

    def __str__(self) -> str:
        return (
            f"[PayloadFormatIndicator : {self.PayloadFormatIndicator}, "
            f"ContentType : {self.ContentType}, UserProperty : {self.UserProperty}]"
        )

    __repr__ = __str__


# --- events: what the owner receives instead of paho's callbacks --------------------------


@dataclass(frozen=True, slots=True)
class Connected:
    """CONNACK accepted. receive_max: the broker's Receive Maximum (MQTT 5, else the cap)."""

    session_present: bool
    receive_max: int = SERVER_RECEIVE_MAX


@dataclass(frozen=True, slots=True)
class Refused:
    """CONNACK refused with this reason code; `error` says what to do about it."""

    code: int
    name: str
    error: MqttRefusedError


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The TCP connect or TLS handshake failed; `cause` is the socket's or ssl's reason."""

    cause: str | None


@dataclass(frozen=True, slots=True)
class Disconnected:
    """The connection ended (or was never accepted) with this reason code."""

    code: int
    name: str


@dataclass(frozen=True, slots=True)
class Published:
    """The PUBACK of message `mid`: `code` >= 0x80 is a denial."""

    mid: int
    code: int
    name: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A SUBACK; `refused` pairs each filter the broker refused with the reason's name."""

    refused: tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    """An UNSUBACK."""


ClientEvent = (
    Connected | Refused | Unreachable | Disconnected | Published | Subscribed | Unsubscribed
)
Emit = Callable[[ClientEvent], None]
OnConnect = Callable[[mqtt.Client, Connected], None]
"""Runs on paho's thread right after an accepted CONNACK, before `Connected` is emitted."""
OnMessage = Callable[[mqtt.MQTTMessage], None]


# --- the client ---------------------------------------------------------------------------


class SelectableEvent(threading.Event):
    """A threading.Event that also wakes a `select`: `set()` from any thread makes
    `fileno()` readable until `clear()`. How other threads wake `MqttClient.poll`."""

    def __init__(self) -> None:
        super().__init__()
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)

    def fileno(self) -> int:
        return self._reader.fileno()

    def set(self) -> None:
        super().set()
        with contextlib.suppress(BlockingIOError, OSError):  # full: it is readable anyway
            self._writer.send(b"\0")

    def clear(self) -> None:
        # Drain first, then lower the flag: a set() in between leaves a byte, so no wake-up
        # is ever lost (a spurious one may happen, which costs one empty loop).
        with contextlib.suppress(BlockingIOError, OSError):
            while self._reader.recv(4096):
                pass
        super().clear()

    def close(self) -> None:
        """Release the socket pair (also done when the event is garbage collected)."""
        self._reader.close()
        self._writer.close()

    __del__ = close



def session_properties(expiry_s: int, receive_max: int | None = None) -> Properties:
    """MQTT 5 CONNECT properties: how long the broker keeps the session, how much in flight."""
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    if receive_max is not None:
        props.ReceiveMaximum = receive_max
    return props


class MqttClient:
    """A paho client built from `[mqtt]`; paho's callbacks become typed events for `emit`."""

    def __init__(
        self,
        settings: MqttSettings,
        client_id: str,
        *,
        emit: Emit,
        on_message: OnMessage | None = None,
        on_connect: OnConnect | None = None,
        before_connect: Callable[[mqtt.Client], None] | None = None,
        manual_ack: bool = False,
        subscribed_filters: tuple[str, ...] = (),
        fresh_session: bool | None = None,
        paho_class: type[mqtt.Client] = mqtt.Client,
    ) -> None:
        """fresh_session: MQTT 3.1.1's clean session (default: session_expiry_s == 0);
        paho_class: paho's Client or a subclass of it (ingest: mqtt_bulk.BulkClient)."""
        self.settings = settings
        self.client_id = client_id
        self.v5 = settings.protocol == "5"
        self._emit = emit
        self._on_message = on_message
        self._on_connect_hook = on_connect
        self._before_connect = before_connect
        self._filters = subscribed_filters
        self._lock = threading.Lock()
        self._running = False
        self._in_caller = False
        self._retry_at_m = 0.0
        self._retry_delay_s: float | None = None
        if fresh_session is None:
            fresh_session = settings.session_expiry_s == 0
        self.paho = paho_class(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else fresh_session,
            manual_ack=manual_ack,
        )
        if log.isEnabledFor(logging.DEBUG):  # paho logs every lost connection as ERROR
            self.paho.enable_logger(logging.getLogger(f"{__name__}.paho"))
        self.paho.reconnect_delay_set(RECONNECT_MIN_DELAY_S, settings.reconnect_max_s)
        if settings.username is not None:
            self.paho.username_pw_set(settings.username, settings.password_value())
        if settings.uses_tls:
            set_tls(self.paho, settings.tls)
        self.paho.on_pre_connect = self._paho_pre_connect
        self.paho.on_connect = self._paho_connect
        self.paho.on_connect_fail = self._paho_connect_fail
        self.paho.on_disconnect = self._paho_disconnect
        self.paho.on_publish = self._paho_publish
        self.paho.on_subscribe = self._paho_subscribe
        self.paho.on_unsubscribe = self._paho_unsubscribe
        self.paho.on_message = self._paho_message

    @property
    def running(self) -> bool:
        return self._running

    def start(
        self,
        *,
        clean_start: bool | None = None,
        properties: Properties | None = None,
        in_caller: bool = False,
    ) -> None:
        """Connect in the background on paho's thread; it reconnects with backoff by itself.
        With `in_caller`, nothing runs until the owner calls `poll()` from its own thread.

        MQTT 5 without arguments: resume the session for session_expiry_s (a fresh one if 0).
        """
        s = self.settings
        options: dict[str, Any] = {}
        if self.v5:
            if clean_start is None:
                clean_start = s.session_expiry_s == 0
            if properties is None and not clean_start:
                properties = session_properties(s.session_expiry_s)
            options = {"clean_start": clean_start, "properties": properties}
        with paho_errors(f"cannot start MQTT to {s.display_url()}"):
            self.paho.connect_async(s.host, s.port, s.keepalive_s, **options)
            if not in_caller:
                self.paho.loop_start()
        self._in_caller = in_caller
        self._retry_at_m = 0.0
        with self._lock:
            self._running = True

    def poll(self, timeout_s: float, wake: SelectableEvent | None = None) -> None:
        """In-caller mode: wait up to `timeout_s` for the broker or `wake`, then read what
        arrived (callbacks run here), write what is queued, keep alive, reconnect when due."""
        sock = self.paho.socket()
        if sock is None:
            self._poll_disconnected(timeout_s, wake)
            return
        readers: list[Any] = [sock] if wake is None else [sock, wake]
        writers = [sock] if self.paho.want_write() else []
        pending = getattr(sock, "pending", None)  # TLS may hold decrypted bytes already
        buffered = pending is not None and pending() > 0
        try:
            readable, _, _ = select.select(
                readers, writers, [], 0.0 if buffered else max(0.0, timeout_s)
            )
        except (OSError, ValueError):  # the socket closed under us: paho notices on read
            readable = [sock]
        if buffered or sock in readable:
            self.paho.loop_read()
        if self.paho.socket() is not None and self.paho.want_write():
            self.paho.loop_write()
        if self.paho.socket() is not None:
            self.paho.loop_misc()
        if self.paho.socket() is None:
            self._retry_later()

    def _poll_disconnected(self, timeout_s: float, wake: SelectableEvent | None) -> None:
        if self._retry_at_m == float("inf"):  # the connection ended outside poll (a publish)
            self._retry_later()
        now_m = time.monotonic()
        if self._running and now_m >= self._retry_at_m:
            self._connect_now()
            return
        wait_s = max(0.0, min(timeout_s, self._retry_at_m - now_m))
        if wake is None:
            time.sleep(wait_s)
        else:
            select.select([wake], [], [], wait_s)

    def _connect_now(self) -> None:
        """One connection attempt (TCP, TLS, CONNECT); the CONNACK arrives through poll()."""
        try:
            self.paho.reconnect()
        except (OSError, ValueError) as exc:  # refused, timed out, certificate, bad host
            self._retry_later()
            self._emit(Unreachable(str(exc)))
            return
        no_delay(self.paho)
        self._retry_at_m = float("inf")  # until this connection ends

    def _retry_later(self) -> None:
        """Schedule the next attempt: 1 s, doubling to reconnect_max_s, reset by a CONNACK."""
        if self._retry_at_m != float("inf") and self._retry_at_m > time.monotonic():
            return  # already scheduled
        delay_s = self._retry_delay_s
        delay_s = RECONNECT_MIN_DELAY_S if delay_s is None else min(
            delay_s * 2, self.settings.reconnect_max_s
        )
        self._retry_delay_s = delay_s
        self._retry_at_m = time.monotonic() + delay_s

    def stop(self, *, reason_code: int | None = None, properties: Properties | None = None) -> None:
        """Disconnect (MQTT 5: with `reason_code`) and stop paho's thread; safe to repeat."""
        with self._lock:
            if not self._running:
                return
            self._running = False
        code = None
        if self.v5 and reason_code is not None:
            code = ReasonCode(PacketTypes.DISCONNECT, identifier=reason_code)
        self.paho.disconnect(reasoncode=code, properties=properties)
        if not self._in_caller:
            self.paho.loop_stop()

    # -- paho callbacks: paho's thread; they only convert and hand over -------------------

    def _paho_pre_connect(self, client: mqtt.Client, userdata: Any) -> None:
        if self._before_connect is not None:
            self._before_connect(client)

    def _paho_connect(self, client: mqtt.Client, userdata: Any, flags: mqtt.ConnectFlags,
                      reason_code: ReasonCode, properties: Properties | None) -> None:
        if reason_code.is_failure:
            code, name = reason(reason_code)
            error = connect_refusal(code, name, self.settings.display_url())
            self._emit(Refused(code, name, error))
            return
        receive_max = getattr(properties, "ReceiveMaximum", SERVER_RECEIVE_MAX)
        self._retry_delay_s = None
        event = Connected(bool(flags.session_present), int(receive_max))
        if self._on_connect_hook is not None:
            self._on_connect_hook(client, event)
        self._emit(event)

    def _paho_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError:` without the exception; the one
        # being handled says why (refused, timed out, certificate verify failed).
        cause = sys.exc_info()[1]
        self._emit(Unreachable(None if cause is None else str(cause)))

    def _paho_disconnect(self, client: mqtt.Client, userdata: Any, flags: mqtt.DisconnectFlags,
                         reason_code: ReasonCode, properties: Properties | None) -> None:
        self._emit(Disconnected(*reason(reason_code)))

    def _paho_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_code: ReasonCode, properties: Properties | None) -> None:
        self._emit(Published(mid, *reason(reason_code)))

    def _paho_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                        reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        refused = tuple((f, rc.getName()) for f, rc in zip(self._filters, reason_codes,
                                                             strict=False) if rc.is_failure)
        if not self._filters:
            refused = tuple(("?", rc.getName()) for rc in reason_codes if rc.is_failure)
        self._emit(Subscribed(refused))

    def _paho_unsubscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                          reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        self._emit(Unsubscribed())

    def _paho_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._on_message(message)
