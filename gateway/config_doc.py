"""Render docs/configuration.md from the configuration models, so the docs cannot drift.

Run: python -m gateway.config_doc > docs/configuration.md  (a test compares the two).
"""

from __future__ import annotations

import typing
from pathlib import Path
from types import UnionType

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from gateway.adapters.fhir_rest import FhirSettings
from gateway.adapters.influx import InfluxSettings
from gateway.adapters.mllp import Hl7Settings
from gateway.adapters.mqtt import MqttSettings, MqttTls
from gateway.adapters.serial_port import SourceSettings
from gateway.alert_settings import RuleSettings
from gateway.config import GatewaySection, HealthSection, StoreSection
from gateway.dashboard.settings import DashboardSettings

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"

HEADER = """\
# Configuration

One TOML file plus `PUMPGW_*` environment variables. Variables override the file; nested keys
use a double underscore: `PUMPGW_MQTT__URL`, `PUMPGW_MQTT__PASSWORD`, `PUMPGW_INFLUX__TOKEN`,
`PUMPGW_GATEWAY__STATION`. `pumpgw check-config FILE` prints every problem with its key path
and exits 2; a valid file prints a summary (secrets are never printed). Unknown keys are errors.

Secrets (`mqtt.password`, `influx.token`, `influx.password`, `fhir.token`,
`gateway.pseudonymize_key`) are
best given as environment variables or as `*_file` paths to files readable only by their owner
(mode 600): a file readable by group or others is refused. They never appear in logs, metrics,
status payloads or process arguments.

An annotated example: [config/pumpgw.example.toml](../config/pumpgw.example.toml).
Alert rules are explained in [alerts.md](alerts.md); the outbox in [outbox.md](outbox.md).

This file is generated from the code by `python -m gateway.config_doc`.
"""

SECTIONS: tuple[tuple[str, str, type[BaseModel]], ...] = (
    ("gateway", "`[gateway]`: this station", GatewaySection),
    ("sources", "`[[sources]]`: serial lines (one table per line)", SourceSettings),
    ("mqtt", "`[mqtt]`: the broker", MqttSettings),
    ("mqtt.tls", "`[mqtt.tls]`: TLS for `mqtts://`", MqttTls),
    ("influx", "`[influx]`: the time-series database (optional)", InfluxSettings),
    ("hl7", "`[hl7]`: HL7 v2 PCD-01/PCD-04 over MLLP (optional, docs/interoperability.md)",
     Hl7Settings),
    ("fhir", "`[fhir]`: FHIR R4 transaction Bundles (optional, docs/interoperability.md)",
     FhirSettings),
    ("store", "`[store]`: the outbox", StoreSection),
    ("health", "`[health]`: /healthz and /metrics", HealthSection),
    ("dashboard", "`[dashboard]`: the ward page (`pumpgw dashboard`)", DashboardSettings),
    (
        "alerts.defaults",
        "`[alerts.defaults]`: alert rules (the same keys override per drug in "
        '`[alerts.per_drug.<drug>]` and per pump in `[alerts.per_pump."<id>"]`)',
        RuleSettings,
    ),
)


def _submodel(annotation: object) -> type[BaseModel] | None:
    candidates = [annotation, *typing.get_args(annotation)]
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _type_name(annotation: object) -> str:
    if isinstance(annotation, UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(annotation))
    if typing.get_origin(annotation) is typing.Literal:
        return " / ".join(
            f'"{a}"' if isinstance(a, str) else str(a) for a in typing.get_args(annotation)
        )
    if annotation is type(None):
        return "none"
    return getattr(annotation, "__name__", str(annotation))


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.default
    if value is PydanticUndefined or isinstance(value, BaseModel):
        return ""
    return "none" if value is None else f"`{value}`"


def _rows(model: type[BaseModel]) -> list[str]:
    rows = []
    for name, field in model.model_fields.items():
        if _submodel(field.annotation) is not None:
            continue  # a section of its own
        description = (field.description or "").replace("|", "\\|").replace("\n", " ")
        rows.append(
            f"| `{name}` | {_type_name(field.annotation)} | {_default(field)} | {description} |"
        )
    return rows


def render() -> str:
    parts = [HEADER]
    for _, title, model in SECTIONS:
        parts.append(f"\n## {title}\n")
        parts.append("| key | type | default | meaning |\n|---|---|---|---|")
        parts.extend(_rows(model))
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    print(render(), end="")
