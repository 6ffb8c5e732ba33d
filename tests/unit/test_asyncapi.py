"""The AsyncAPI document: no drift from the code, true to the topic tree, and valid for the
AsyncAPI project's own parser (@asyncapi/parser, run with node from tests/node)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from gateway.adapters.mqtt import QOS
from gateway.adapters.mqtt_client import MqttSettings
from gateway.records import GATEWAY_PUMP_ID
from gateway.topics import (
    PUMP_LEAVES,
    TopicBase,
    ack_refusal_topic,
    deadletter_topic,
    is_retained,
    status_topic,
    topic_for,
)
from schemas import asyncapi, export
from schemas.models import MODELS_BY_KIND

REPO = Path(__file__).resolve().parents[2]
NODE_TESTS = REPO / "tests" / "node"
VALIDATE = NODE_TESTS / "validate-asyncapi.mjs"
DOCUMENT = export.SCHEMA_DIR / asyncapi.DOCUMENT_NAME
BASE = TopicBase(site="north", station="ward-3")
VALUES = {"prefix": "pumpgw", "site": "north", "station": "ward-3", "pump_id": "P0001",
          "username": "nurse.jones"}  # fmt: skip


def checked_in() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DOCUMENT.read_text(encoding="utf-8"))
    return document


def run_parser(path: Path) -> subprocess.CompletedProcess[str]:
    """node validate-asyncapi.mjs PATH; fails (never skips) when node or the parser is missing."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: run scripts/bootstrap.sh (Debian: apt-get install "
                    "nodejs npm)")  # fmt: skip
    if not (NODE_TESTS / "node_modules" / "@asyncapi" / "parser").is_dir():
        pytest.fail("@asyncapi/parser is not installed in tests/node: run scripts/bootstrap.sh "
                    "(it runs `npm ci` there; Debian packages: nodejs npm)")  # fmt: skip
    return subprocess.run([node, str(VALIDATE), str(path)], capture_output=True, text=True,
                          cwd=NODE_TESTS, timeout=120, check=False)  # fmt: skip


def concrete(address: str) -> str:
    return address.format(**VALUES)


def payload_validator(document: dict[str, Any], message_id: str) -> jsonschema.Draft7Validator:
    """The message's payload schema as AsyncAPI reads it (a superset of JSON Schema draft 07)."""
    payload_ref = document["components"]["messages"][message_id]["payload"]["$ref"]
    root = {"$ref": payload_ref, "components": document["components"]}
    return jsonschema.Draft7Validator(root)


def test_checked_in_document_matches_the_code() -> None:
    assert asyncapi.DOCUMENT_NAME not in export.drift(), "run `python -m schemas.export`"
    assert DOCUMENT.read_text(encoding="utf-8") == export.expected_files()[asyncapi.DOCUMENT_NAME]


def test_check_finds_a_changed_or_missing_document_and_write_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    export.write(tmp_path)
    document = tmp_path / asyncapi.DOCUMENT_NAME
    document.write_text(document.read_text(encoding="utf-8").replace('"qos": 1', '"qos": 0', 1))
    capsys.readouterr()
    assert export.main(["--check", "--dir", str(tmp_path)]) == 1
    assert asyncapi.DOCUMENT_NAME in capsys.readouterr().err
    assert export.write(tmp_path) == [asyncapi.DOCUMENT_NAME]
    document.unlink()
    assert export.drift(tmp_path) == [asyncapi.DOCUMENT_NAME]
    export.write(tmp_path)
    assert document.read_bytes() == DOCUMENT.read_bytes()


def test_asyncapi_parser_accepts_the_checked_in_document() -> None:
    result = run_parser(DOCUMENT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid AsyncAPI 3.0.0: 13 channels, 12 operations, 10 messages" in result.stdout


def test_asyncapi_parser_rejects_a_broken_document(tmp_path: Path) -> None:
    document = checked_in()
    document["operations"]["sendPumpTelemetry"]["bindings"]["mqtt"]["qos"] = 3
    del document["channels"]["pumpStatus"]["parameters"]["pump_id"]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps(document), encoding="utf-8")
    result = run_parser(broken)
    assert result.returncode == 1
    assert "/operations/sendPumpTelemetry/bindings/mqtt/qos" in result.stdout
    assert "Missed: pump_id" in result.stdout
    assert "INVALID" in result.stdout


def test_every_topic_the_gateway_names_is_a_channel() -> None:
    addresses = {concrete(c["address"]) for c in checked_in()["channels"].values()}
    expected = {topic_for(kind, "P0001", BASE) for kind in PUMP_LEAVES} | {
        topic_for("alert", GATEWAY_PUMP_ID, BASE),
        topic_for("active_alerts", GATEWAY_PUMP_ID, BASE),
        status_topic(BASE),
        deadletter_topic(BASE),
        ack_refusal_topic(BASE),
        f"{BASE.root}/ack/nurse.jones",
        f"{BASE.root}/ack",
    }
    assert addresses == expected


def test_every_parameter_has_a_description_and_an_example() -> None:
    for channel in checked_in()["channels"].values():
        named = set(channel["parameters"])
        assert named == {n for n in VALUES if f"{{{n}}}" in channel["address"]}
        assert all(p["description"] and p["examples"] for p in channel["parameters"].values())


def test_qos_and_retain_per_operation_follow_the_gateway() -> None:
    document = checked_in()
    sent_kinds = set()
    for operation in document["operations"].values():
        channel_id = operation["channel"]["$ref"].removeprefix("#/channels/")
        kind = document["channels"][channel_id]["x-pumpgw-kind"]
        binding = operation["bindings"]["mqtt"]
        assert binding["qos"] == QOS
        assert binding["retain"] is is_retained(kind)
        assert binding["bindingVersion"] == "0.2.0"
        if operation["action"] == "send":
            sent_kinds.add(kind)
    assert sent_kinds == set(MODELS_BY_KIND) - {"acknowledgement"}
    retained = {o["channel"]["$ref"] for o in document["operations"].values()
                if o["bindings"]["mqtt"]["retain"]}  # fmt: skip
    assert retained == {f"#/channels/{c}" for c in
                        ("pumpInfo", "pumpActiveAlerts", "pumpStatus", "gatewayStatus",
                         "gatewayActiveAlerts")}  # fmt: skip


def test_acknowledgements_are_received_per_user_and_answered_on_the_alerts_topic() -> None:
    document = checked_in()
    receive = [o for o in document["operations"].values() if o["action"] == "receive"]
    assert len(receive) == 1
    operation = receive[0]
    assert operation["channel"] == {"$ref": "#/channels/acknowledgements"}
    assert document["channels"]["acknowledgements"]["address"].endswith("/ack/{username}")
    assert operation["bindings"]["mqtt"]["retain"] is False
    reply_channel = operation["reply"]["channel"]["$ref"].removeprefix("#/channels/")
    [reply_message] = operation["reply"]["messages"]
    prefix, _, message_id = reply_message["$ref"].rpartition("/")
    assert prefix == f"#/channels/{reply_channel}/messages"
    assert message_id in document["channels"][reply_channel]["messages"]
    assert message_id == "alertTransition"


def test_the_shared_ack_topic_is_described_as_deprecated_and_has_no_operation() -> None:
    document = checked_in()
    legacy = document["channels"]["legacyAcknowledgements"]
    assert legacy["address"] == "{prefix}/{site}/{station}/ack"
    assert {"name": "deprecated"} in legacy["tags"]
    assert "refused" in legacy["description"]
    used = {o["channel"]["$ref"] for o in document["operations"].values()}
    assert "#/channels/legacyAcknowledgements" not in used


def test_the_gateway_session_and_last_will_follow_its_settings() -> None:
    document = checked_in()
    defaults = MqttSettings()
    for name in ("mqtt", "mqtts"):
        binding = document["servers"][name]["bindings"]["mqtt"]
        assert binding["keepAlive"] == defaults.keepalive_s
        assert binding["sessionExpiryInterval"] == defaults.session_expiry_s
        assert binding["cleanSession"] is False
        will = binding["lastWill"]
        assert will["topic"] == document["channels"]["gatewayStatus"]["address"]
        assert (will["qos"], will["retain"]) == (QOS, True)
    assert "bindings" not in document["servers"]["websockets"]


def test_ingest_tags_match_the_workers_shared_subscriptions() -> None:
    tagged = {name for name, c in checked_in()["channels"].items()
              if {"name": "ingest"} in c["tags"]}  # fmt: skip
    assert tagged == {"pumpTelemetry", "pumpEvents", "pumpAlerts", "gatewayAlerts"}
    assert asyncapi.matches("a/+/c", "a/b/c")
    assert asyncapi.matches("a/#", "a/b/c")
    assert not asyncapi.matches("a/+", "a/b/c")
    assert not asyncapi.matches("a/b/c/d", "a/b/c")


@pytest.mark.parametrize("kind", sorted(MODELS_BY_KIND))
def test_payload_schemas_are_the_exported_json_schemas(kind: str) -> None:
    components = checked_in()["components"]["schemas"]
    file_schema = json.loads((export.SCHEMA_DIR / f"{kind}{export.SCHEMA_SUFFIX}").read_text())
    body, defs = asyncapi.embedded_schema(file_schema)
    assert components[MODELS_BY_KIND[kind].__name__] == body
    for name, schema in defs.items():
        assert {k: v for k, v in components[name].items() if k != "title"} == {
            k: v for k, v in schema.items() if k != "title"
        }


@pytest.mark.parametrize("kind", sorted(MODELS_BY_KIND))
def test_examples_validate_against_the_payload_and_the_json_schema_file(kind: str) -> None:
    document = checked_in()
    message_id = asyncapi.MESSAGES[kind][0]
    message = document["components"]["messages"][message_id]
    file_schema = json.loads((export.SCHEMA_DIR / f"{kind}{export.SCHEMA_SUFFIX}").read_text())
    file_validator = jsonschema.Draft202012Validator(file_schema)
    validator = payload_validator(document, message_id)
    assert message["examples"]
    for example in message["examples"]:
        assert list(validator.iter_errors(example["payload"])) == []
        assert list(file_validator.iter_errors(example["payload"])) == []
        MODELS_BY_KIND[kind].model_validate_json(json.dumps(example["payload"]))
    wrong = message["examples"][0]["payload"] | {"schema_version": 2}
    assert not validator.is_valid(wrong)


def test_a_schema_name_used_twice_for_different_schemas_is_refused() -> None:
    schemas = {
        "reading": {"type": "object", "$defs": {"Drug": {"enum": ["a"]}}},
        "info": {"type": "object", "$defs": {"Drug": {"enum": ["b"]}}},
    }
    with pytest.raises(ValueError, match="'Drug'"):
        asyncapi.component_schemas(schemas)
