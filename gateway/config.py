"""Gateway configuration: one TOML file plus PUMPGW_* environment variables.

Environment variables override the file; nested keys use a double underscore:
`PUMPGW_MQTT__URL`, `PUMPGW_INFLUX__TOKEN`, `PUMPGW_GATEWAY__STATION`. Every
problem is reported with its key path (`mqtt.url: ...`). Secrets are SecretStr
and never printed. docs/configuration.md and config/pumpgw.example.toml show
every key.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import tomllib
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from gateway.adapters.fhir_rest import FhirSettings
from gateway.adapters.influx import InfluxSettings
from gateway.adapters.mllp import Hl7Settings
from gateway.adapters.mqtt_client import MqttSettings
from gateway.adapters.serial_port import SourceSettings
from gateway.alert_settings import RulesConfig
from gateway.dashboard.settings import DashboardSettings
from gateway.errors import PumpgwError

log = logging.getLogger(__name__)

S = TypeVar("S", bound="ProcessSettings")
INLINE_SECRET_KEYS = (
    ("mqtt", "password"),
    ("influx", "token"),
    ("influx", "password"),
    ("gateway", "pseudonymize_key"),
)
"""Secrets that belong in the environment or an owner-only file, not in the TOML file."""
SEGMENT = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MIN_PSEUDONYM_KEY_CHARS = 16
"""A shorter key makes the pump-id hash guessable (ids are short and structured)."""
KEY_HINT = f"use at least {MIN_PSEUDONYM_KEY_CHARS} random characters, e.g. openssl rand -hex 32"


class ConfigError(PumpgwError):
    """The configuration is invalid; `problems` lists `key.path: what is wrong` lines."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class GatewaySection(Section):
    site: str = Field("site", description="site name, a topic segment and a tag")
    station: str = Field("station", description="programmer station name, a topic segment")
    pseudonymize_key: SecretStr | None = Field(
        None,
        description="when set, pump ids are replaced by a keyed hash (HMAC-SHA256) before "
        "anything leaves the station; also PUMPGW_GATEWAY__PSEUDONYMIZE_KEY",
    )
    pseudonymize_key_file: Path | None = Field(
        None, description="file holding the pseudonymisation key (mode 600)"
    )
    status_interval_s: float = Field(
        10.0, gt=0, description="how often per-pump status is refreshed"
    )
    ack_allowed: list[str] | None = Field(
        None,
        description="MQTT user names whose acknowledgements of clinical alerts are accepted "
        "(the user is the last level of the ack topic, {root}/ack/{user}, which the broker's "
        "ACL binds to the login); None accepts any user the ACL lets publish there",
    )
    ack_technical: list[str] = Field(
        default_factory=list,
        description="MQTT user names that may acknowledge technical alerts: the gateway's own "
        "(outbox_full, outbox_near_full) and telemetry_lost; empty: nobody can acknowledge them",
    )
    state_refresh_s: float = Field(
        60.0,
        gt=0,
        description="how often retained state (gateway, pump status, active alerts) is "
        "published again with a fresh seq, besides after every reconnect",
    )

    @field_validator("site", "station")
    @classmethod
    def _segment(cls, value: str) -> str:
        if not SEGMENT.match(value):
            raise ValueError("use 1-64 letters, digits, '_', '.', '-' (it becomes a topic segment)")
        return value

    @field_validator("pseudonymize_key")
    @classmethod
    def _long_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < MIN_PSEUDONYM_KEY_CHARS:
            raise ValueError(f"too short; {KEY_HINT}")
        return value

    @field_validator("pseudonymize_key_file")
    @classmethod
    def _private_key_file(cls, value: Path | None) -> Path | None:
        problem = None if value is None else secret_file_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_key(self) -> GatewaySection:
        if self.pseudonymize_key is not None and self.pseudonymize_key_file is not None:
            raise ValueError("set gateway.pseudonymize_key or pseudonymize_key_file, not both")
        return self


class StoreSection(Section):
    path: Path = Field(Path("/var/lib/pumpgw/outbox.db"), description="the SQLite outbox file")
    durability: Literal["full", "normal"] = Field(
        "full", description="SQLite synchronous mode: full survives power loss, normal only a crash"
    )
    max_pending_records: int = Field(
        1_000_000, gt=0, description="records waiting for the slowest sink before back-pressure"
    )
    warn_at_fraction: float = Field(
        0.8, gt=0, lt=1, description="raise the outbox_near_full technical alert at this fill"
    )
    retention_days: float = Field(7.0, ge=0, description="delivered records kept for history")
    gather_ms: float = Field(
        0.0,
        ge=0,
        le=50,
        description="0: commit whatever arrived while the last commit ran (lowest latency); "
        "above 0, under load a read waits up to this long for others to share its commit "
        "(less CPU per reading, more latency: docs/performance.md)",
    )
    min_free_disk_kb: int = Field(
        4096,
        ge=0,
        description="below this free on the outbox's disk, readings wait (outbox_full) while "
        "alerts and delivery use what is left; reading resumes at twice this (docs/outbox.md)",
    )


class HealthSection(Section):
    listen: str = Field(
        "127.0.0.1:9108", description="host:port of /healthz and /metrics; '' disables"
    )
    max_backlog_age_s: float = Field(
        300.0, gt=0, description="/healthz is not ready when a sink's oldest record is older"
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if value and (
            not re.match(r"^[^:\s]+:\d{1,5}$", value) or int(value.rpartition(":")[2]) > 65535
        ):
            raise ValueError("use host:port with a port up to 65535, e.g. 127.0.0.1:9108")
        return value


class ProcessSettings(BaseSettings):
    """How every pumpgw process reads its file and the environment; each process lists its
    own sections: `Settings` (the station gateway, `pumpgw run`) and `IngestSettings`
    (gateway.ingest), which has no `[[sources]]`, `[alerts]`, `[hl7]` or `[fhir]`, so a
    worker's file holding them is refused, not silently ignored.
    """

    if TYPE_CHECKING:  # declared by each process in its own order (the order problems are listed)
        gateway: GatewaySection
        mqtt: MqttSettings
        influx: InfluxSettings | None
        store: StoreSection
        health: HealthSection

    model_config = SettingsConfigDict(
        env_prefix="PUMPGW_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    allow_inline_secrets: bool = Field(
        False,
        description="accept mqtt.password, influx.token, influx.password or "
        "gateway.pseudonymize_key written in this file (warns at every start; prefer "
        "PUMPGW_* variables or the *_file keys)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_file = settings_cls.model_config.get("toml_file")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_file is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_file))
        return tuple(sources)


class Settings(ProcessSettings):
    """The station gateway's whole configuration. Load it with `load_settings(path)`."""

    gateway: GatewaySection = GatewaySection()
    sources: list[SourceSettings] = Field(default_factory=list)
    mqtt: MqttSettings = MqttSettings()
    influx: InfluxSettings | None = None
    hl7: Hl7Settings | None = None
    fhir: FhirSettings | None = None
    store: StoreSection = StoreSection()
    health: HealthSection = HealthSection()
    alerts: RulesConfig = RulesConfig()
    dashboard: DashboardSettings = DashboardSettings()


def _format_errors(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = str(err["msg"]).removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against config/pumpgw.example.toml)"
        problems.append(f"{key}: {message}")
    return problems


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Read the TOML file (if any), apply PUMPGW_* variables, validate; raise ConfigError."""
    return load_settings_as(Settings, path, **overrides)


def load_settings_as(settings_class: type[S], path: Path | None, **overrides: Any) -> S:
    """load_settings for a Settings subclass (the ingest worker's)."""
    if path is not None and not path.is_file():
        raise ConfigError([f"{path}: no such configuration file"])
    config = {**settings_class.model_config, "toml_file": path}
    name = f"File{settings_class.__name__}"
    file_settings = type(name, (settings_class,), {"model_config": config})
    try:
        settings: S = file_settings(**overrides)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc)) from exc
    except SettingsError as exc:
        raise ConfigError([_environment_problem(exc, path)]) from exc
    except RecursionError as exc:
        raise ConfigError([f"{path}: nested too deeply to be a configuration"]) from exc
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read it as TOML: {exc}"]) from exc
    problems = _url_problems(settings) + _inline_secret_problems(settings, path)
    if problems:
        raise ConfigError(problems)
    warning = inline_secrets_warning(settings, path)
    if warning is not None:
        log.warning("%s", warning)
    return settings


def _environment_problem(exc: SettingsError, path: Path | None) -> str:
    """A PUMPGW_* variable pydantic-settings could not decode, named by its key."""
    field = re.search(r'field "([^"]+)"', str(exc))
    key = field.group(1) if field else str(path)
    variable = f"PUMPGW_{key.upper()}" if field else "a PUMPGW_* variable"
    return f"{key}: {variable}... cannot be read ({exc.__cause__ or exc})"


def _url_problems(settings: ProcessSettings) -> list[str]:
    """Secrets must not ride in a URL (logs, screens and proxies show URLs)."""
    problems = []
    if settings.influx is not None:
        parts = urllib.parse.urlsplit(settings.influx.url)
        if parts.query or parts.fragment:
            problems.append(
                "influx.url: no query string or fragment (a token there would be logged); "
                "put the token in PUMPGW_INFLUX__TOKEN or influx.token_file"
            )
    return problems


def inline_secret_keys(path: Path | None) -> list[str]:
    """Key paths of secrets written in the TOML file itself."""
    if path is None:
        return []
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []  # loading reported it
    found = []
    for section, key in INLINE_SECRET_KEYS:
        table = document.get(section)
        if isinstance(table, dict) and key in table:
            found.append(f"{section}.{key}")
    return found


def _inline_secret_problems(settings: ProcessSettings, path: Path | None) -> list[str]:
    if settings.allow_inline_secrets:
        return []
    return [
        f"{key}: a secret written in {path}; set PUMPGW_{key.upper().replace('.', '__')} or "
        f"{key}_file (mode 600) instead, or allow_inline_secrets = true at the top of the file"
        for key in inline_secret_keys(path)
    ]


def inline_secrets_warning(settings: ProcessSettings, path: Path | None) -> str | None:
    """The warning every start gives while allow_inline_secrets lets a secret sit in the file."""
    keys = inline_secret_keys(path) if settings.allow_inline_secrets else []
    if not keys:
        return None
    return (
        f"allow_inline_secrets = true: {', '.join(keys)} written in {path}, which backups, "
        "editors and version control may copy; move them to PUMPGW_* variables or *_file keys"
    )


def secret_file_problem(path: Path) -> str | None:
    """Why a secret file must not be used (missing, not a file, open to others), or None."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as exc:
        return f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}"
    if not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        return f"{path} is readable by group or others; run: chmod 600 {path}"
    return None


def read_secret_file(path: Path, key: str) -> SecretStr:
    """Read a secret from a file that only its owner can read; raise ConfigError otherwise."""
    problem = secret_file_problem(path)
    if problem is not None:
        raise ConfigError([f"{key}: {problem}"])
    try:
        return SecretStr(path.read_text(encoding="utf-8").strip())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{key}: cannot read {path}: {exc}"]) from exc


def pseudonymize_key(section: GatewaySection) -> bytes | None:
    """The pump-id hashing key from the setting or its file, if configured."""
    if section.pseudonymize_key is not None:
        return section.pseudonymize_key.get_secret_value().encode()
    if section.pseudonymize_key_file is not None:
        key = "gateway.pseudonymize_key_file"
        secret = read_secret_file(section.pseudonymize_key_file, key).get_secret_value()
        if len(secret) < MIN_PSEUDONYM_KEY_CHARS:
            raise ConfigError(
                [f"{key}: the key in {section.pseudonymize_key_file} is too short; {KEY_HINT}"]
            )
        return secret.encode()
    return None


def environment_keys() -> list[str]:
    """PUMPGW_* variable names set now (for check-config's report; values never shown)."""
    return sorted(k for k in os.environ if k.startswith("PUMPGW_"))
