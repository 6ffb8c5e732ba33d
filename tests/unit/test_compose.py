"""Deployment files, checked without Docker: compose, Dockerfile, env files, Grafana, Mosquitto,
Prometheus rules, systemd units and udev rules. tests/integration/test_deploy.py runs them.
"""

from __future__ import annotations

import configparser
import fnmatch
import json
import random
import re
import shlex
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from paho.mqtt.client import topic_matches_sub

from gateway.adapters.influx import InfluxSettings, InfluxSink
from gateway.adapters.mqtt import MqttSink
from gateway.adapters.mqtt_client import MqttSettings
from gateway.cli import build_parser as pumpgw_parser
from gateway.config import load_settings
from gateway.health import Observation, SinkObservation, SourceObservation, render_metrics
from gateway.ingest import load_ingest_settings, subscriptions
from gateway.outbox import Outbox
from gateway.topics import TopicBase
from simulator.cli import build_parser as pumpsim_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_SCHEMA = ROOT / "tests" / "data" / "compose-spec.schema.json"
ENV_FILES = {
    "deploy/influxdb.env": DEPLOY / "influxdb.env.example",
    "deploy/pumpgw.env": DEPLOY / "pumpgw.env.example",
    "deploy/ingest.env": DEPLOY / "ingest.env.example",
    "deploy/grafana.env": DEPLOY / "grafana.env.example",
    "deploy/mosquitto/users.env": DEPLOY / "mosquitto" / "users.env.example",
}
"""Env files compose reads (made by deploy/make-env.sh, never committed) and their examples."""


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def service(name: str) -> dict[str, Any]:
    found: dict[str, Any] = compose()["services"][name]
    return found


def mounts(name: str) -> dict[str, str]:
    """Container path -> source (a ./path or a volume name) of a service's volumes."""
    out = {}
    for entry in service(name).get("volumes", []):
        source, target = entry.split(":")[:2]
        out[target] = source
    return out


def env_values(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def instructions(name: str) -> list[str]:
    return [args for instruction, args in dockerfile() if instruction == name]


# --- docker-compose.yml -----------------------------------------------------------------------


def test_compose_file_validates_against_the_compose_specification() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(compose()))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def test_compose_schema_catches_a_misspelt_service_key() -> None:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    broken = compose()
    broken["services"]["gateway"]["enviroment"] = {"A": "1"}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_compose_has_the_stack_with_the_pinned_images() -> None:
    services = compose()["services"]
    assert services["mosquitto"]["image"] == "eclipse-mosquitto:2"
    assert services["influxdb"]["image"] == "influxdb:2.7"
    assert services["gateway"]["build"] == {"context": ".", "dockerfile": "Dockerfile"}
    assert services["simulator"]["image"] == services["gateway"]["image"]
    assert services["grafana"]["image"].startswith("grafana/grafana-oss:")
    assert {"ingest-1", "ingest-2"} <= set(services)


def test_every_file_compose_mounts_or_builds_from_exists() -> None:
    for name, body in compose()["services"].items():
        for entry in body.get("volumes", []):
            source = entry.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name}: {source} does not exist"
        build = body.get("build")
        if build is not None:
            assert (ROOT / build["context"] / build["dockerfile"]).is_file()


def test_every_named_volume_is_declared() -> None:
    declared = set(compose()["volumes"])
    for name, body in compose()["services"].items():
        for entry in body.get("volumes", []):
            source = entry.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source} not declared"


def test_every_env_file_has_an_example_that_make_env_writes() -> None:
    used = {e["path"] for body in compose()["services"].values() for e in body.get("env_file", [])}
    used |= {e["path"] for e in compose()["x-ingest"]["env_file"]}
    assert used == set(ENV_FILES)
    make_env = (DEPLOY / "make-env.sh").read_text()
    for target, example in ENV_FILES.items():
        assert example.is_file(), example
        assert target.removeprefix("deploy/") + '"' in make_env, f"make-env.sh skips {target}"


def test_env_files_are_not_committed_or_sent_to_docker() -> None:
    ignored = (DEPLOY / ".gitignore").read_text().split()
    for target in ENV_FILES:
        relative = target.removeprefix("deploy/")
        assert any(fnmatch.fnmatch(relative, p) for p in ignored), f"{target} not git-ignored"
        assert docker_context_excludes(target)


def test_published_ports_are_loopback_only() -> None:
    for name, body in compose()["services"].items():
        for port in body.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every address"


def test_simulator_runs_the_ward_over_tcp_on_the_port_the_gateway_reads() -> None:
    sim = service("simulator")
    assert sim["entrypoint"] == ["pumpsim"]
    args = pumpsim_parser().parse_args(["run", *sim["command"]])
    assert (args.transport, args.listen, args.pumps, args.scenario, args.speed) == (
        "tcp", "0.0.0.0:7001", 10, "ward", "600",
    )  # fmt: skip
    sources = load_settings(ROOT / "config" / "pumpgw.compose.toml").sources
    assert [s.url for s in sources] == ["socket://simulator:7001"]


def test_gateway_service_mounts_its_config_where_the_command_reads_it() -> None:
    gateway = service("gateway")
    args = pumpgw_parser().parse_args(gateway["command"])
    assert args.command == "run"
    assert mounts("gateway")[str(args.config)] == "./config/pumpgw.compose.toml"
    settings = load_settings(ROOT / "config" / "pumpgw.compose.toml")
    assert mounts("gateway")["/var/lib/pumpgw"] == "outbox"
    assert settings.store.path.parent == Path("/var/lib/pumpgw")
    port = settings.health.listen.rsplit(":", 1)[1]
    assert f"127.0.0.1:{port}:{port}" in gateway["ports"]
    assert settings.mqtt.host == "mosquitto"
    assert settings.influx is not None
    assert settings.influx.url == "http://influxdb:8086"


def test_the_env_example_points_hl7_and_fhir_at_an_engine_when_uncommented(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lines = (DEPLOY / "pumpgw.env.example").read_text().splitlines()
    optional = dict(
        line.removeprefix("# ").split("=", 1)
        for line in lines
        if line.startswith(("# PUMPGW_HL7__", "# PUMPGW_FHIR__"))
    )
    assert set(optional) >= {"PUMPGW_HL7__URL", "PUMPGW_FHIR__BASE_URL", "PUMPGW_FHIR__TOKEN"}
    for key, value in optional.items():
        monkeypatch.setenv(key, value)
    settings = load_settings(ROOT / "config" / "pumpgw.compose.toml")
    assert settings.hl7 is not None
    assert settings.hl7.url == optional["PUMPGW_HL7__URL"]
    assert settings.fhir is not None
    assert settings.fhir.token is not None
    assert settings.fhir.token.get_secret_value() == optional["PUMPGW_FHIR__TOKEN"]


def test_dashboard_service_serves_the_page_and_points_at_the_websocket_listener() -> None:
    dashboard = service("dashboard")
    assert dashboard["image"] == service("gateway")["image"]
    args = pumpgw_parser().parse_args(dashboard["command"])
    assert args.command == "dashboard"
    assert mounts("dashboard")[str(args.config)] == "./config/pumpgw.compose.toml"
    settings = load_settings(ROOT / "config" / "pumpgw.compose.toml")
    port = settings.dashboard.listen.rsplit(":", 1)[1]
    assert dashboard["ports"] == [f"127.0.0.1:{port}:{port}"]
    assert f":{port}/" in " ".join(dashboard["healthcheck"]["test"])
    assert "mosquitto" in dashboard["depends_on"]
    # No broker_url: the page uses ws://<its own host>:9001, the listener compose publishes.
    assert settings.dashboard.broker_url is None
    assert "127.0.0.1:9001:9001" in [p.split()[0] for p in service("mosquitto")["ports"]]
    conf = (DEPLOY / "mosquitto" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 9001\nprotocol websockets$", conf, re.MULTILINE)


def test_compose_config_holds_no_secrets() -> None:
    text = (ROOT / "config" / "pumpgw.compose.toml").read_text()
    settings = load_settings(ROOT / "config" / "pumpgw.compose.toml")
    assert settings.mqtt.password is None
    assert settings.influx is not None
    assert settings.influx.token is None
    assert "token =" not in text
    assert "password =" not in text


def test_influx_org_and_bucket_agree_everywhere() -> None:
    init = env_values(DEPLOY / "influxdb.env.example")
    org, bucket = init["DOCKER_INFLUXDB_INIT_ORG"], init["DOCKER_INFLUXDB_INIT_BUCKET"]
    gateway = load_settings(ROOT / "config" / "pumpgw.compose.toml").influx
    ingest = load_ingest_settings(DEPLOY / "ingest" / "pumpgw-ingest.toml").influx
    assert gateway is not None
    assert ingest is not None
    assert (gateway.org, gateway.bucket) == (ingest.org, ingest.bucket) == (org, bucket)
    sources = {d["uid"]: d for d in grafana_datasources()}
    assert sources["pumpgw-influxql"]["jsonData"]["dbName"] == bucket
    assert sources["pumpgw-flux"]["jsonData"]["organization"] == org
    assert sources["pumpgw-flux"]["jsonData"]["defaultBucket"] == bucket


def test_make_env_writes_matching_random_secrets(tmp_path: Path) -> None:
    subprocess.run(["sh", str(DEPLOY / "make-env.sh"), str(tmp_path)], check=True,
                   capture_output=True)  # fmt: skip
    files = {t: tmp_path / t.removeprefix("deploy/") for t in ENV_FILES}
    values = {t: env_values(p) for t, p in files.items()}
    for target, path in files.items():
        assert path.stat().st_mode & 0o077 == 0, f"{target} is readable by others"
        kept = [k for k, v in values[target].items() if v.startswith("change-me")]
        assert not kept, f"{target} kept placeholders: {kept}"
    users = values["deploy/mosquitto/users.env"]
    token = values["deploy/influxdb.env"]["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert values["deploy/pumpgw.env"]["PUMPGW_MQTT__PASSWORD"] == users["MQTT_GATEWAY_PASSWORD"]
    assert values["deploy/ingest.env"]["PUMPGW_MQTT__PASSWORD"] == users["MQTT_INGEST_PASSWORD"]
    assert values["deploy/pumpgw.env"]["PUMPGW_INFLUX__TOKEN"] == token
    assert values["deploy/ingest.env"]["PUMPGW_INFLUX__TOKEN"] == token
    assert values["deploy/grafana.env"]["INFLUX_TOKEN"] == token
    passwords = [v for k, v in users.items() if k.endswith("_PASSWORD")]
    assert len(set(passwords)) == len(passwords) == 4
    assert all(len(v) >= 40 and ":" not in v for v in passwords)


def test_example_env_files_agree_on_shared_values() -> None:
    users = env_values(DEPLOY / "mosquitto" / "users.env.example")
    gateway = env_values(DEPLOY / "pumpgw.env.example")
    token = env_values(DEPLOY / "influxdb.env.example")["DOCKER_INFLUXDB_INIT_ADMIN_TOKEN"]
    assert gateway["PUMPGW_MQTT__PASSWORD"] == users["MQTT_GATEWAY_PASSWORD"]
    config = tomllib.loads((ROOT / "config" / "pumpgw.compose.toml").read_text())
    site_station = f"{config['gateway']['site']}/{config['gateway']['station']}"
    assert config["mqtt"]["username"] == users["MQTT_GATEWAY_USER"] == site_station
    assert gateway["PUMPGW_INFLUX__TOKEN"] == token
    assert env_values(DEPLOY / "grafana.env.example")["INFLUX_TOKEN"] == token


# --- Dockerfile and .dockerignore -------------------------------------------------------------


def docker_context_excludes(path: str) -> bool:
    """Whether .dockerignore keeps `path` out of the build context (last match wins)."""
    excluded = False
    for raw in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = raw.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/").removeprefix("**/")
        parts = Path(path).parts
        candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))] + list(parts)
        if any(fnmatch.fnmatch(c, pattern) for c in candidates):
            excluded = not negated
    return excluded


def test_dockerfile_builds_from_python_slim_as_a_non_root_user() -> None:
    assert instructions("FROM") == ["python:3.11-slim"]
    users = instructions("USER")
    assert users
    assert users[-1] not in ("root", "0")
    assert any("useradd" in run and "--groups dialout" in run for run in instructions("RUN"))
    assert any(run.startswith("pip install .") for run in instructions("RUN"))
    assert json.loads(instructions("ENTRYPOINT")[0]) == ["pumpgw"]
    cmd = json.loads(instructions("CMD")[0])
    assert pumpgw_parser().parse_args(cmd).command == "run"


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_context() -> None:
    copies = instructions("COPY")
    assert copies
    for args in copies:
        *sources, _target = args.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            assert not docker_context_excludes(source), f".dockerignore excludes {source}"
    for secret in (".venv/bin/python", "outbox.db", "deploy/pumpgw.env"):
        assert docker_context_excludes(secret), f"{secret} would be sent to Docker"


def test_dockerfile_config_and_volume_match_compose() -> None:
    copied = {args.split()[-1]: args.split()[0] for args in instructions("COPY")}
    assert copied["/etc/pumpgw/pumpgw.toml"] == "config/pumpgw.compose.toml"
    assert json.loads(instructions("VOLUME")[0]) == ["/var/lib/pumpgw"]


def test_dockerfile_healthcheck_polls_healthz_on_the_configured_port() -> None:
    check = instructions("HEALTHCHECK")[0]
    command = json.loads(check.split("CMD", 1)[1])
    port = load_settings(ROOT / "config" / "pumpgw.compose.toml").health.listen.rsplit(":")[1]
    assert command[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{port}/healthz" in command[2]
    assert service("simulator")["healthcheck"] == {"disable": True}


# --- Grafana ----------------------------------------------------------------------------------


def grafana_datasources() -> list[dict[str, Any]]:
    path = DEPLOY / "grafana" / "provisioning" / "datasources" / "pumpgw.yml"
    sources: list[dict[str, Any]] = yaml.safe_load(path.read_text())["datasources"]
    return sources


def test_grafana_default_datasource_speaks_influxql_to_influxdb_2() -> None:
    default = [d for d in grafana_datasources() if d.get("isDefault")]
    assert len(default) == 1
    source = default[0]
    assert source["type"] == "influxdb"
    assert "version" not in source["jsonData"]  # InfluxQL, what the dashboard's queries are
    assert source["url"] == "http://influxdb:8086"
    assert source["jsonData"]["httpHeaderName1"] == "Authorization"
    assert source["secureJsonData"]["httpHeaderValue1"] == "Token ${INFLUX_TOKEN}"
    dashboard = json.loads((DEPLOY / "grafana" / "pumpgw-dashboard.json").read_text())
    ds = {v["name"]: v for v in dashboard["templating"]["list"]}["DS"]
    assert ds["query"] == source["type"]


def test_grafana_provisions_the_dashboard_from_where_compose_mounts_it() -> None:
    path = DEPLOY / "grafana" / "provisioning" / "dashboards" / "pumpgw.yml"
    provider = yaml.safe_load(path.read_text())["providers"][0]
    folder = provider["options"]["path"]
    grafana = mounts("grafana")
    assert grafana[f"{folder}/pumpgw-dashboard.json"] == "./deploy/grafana/pumpgw-dashboard.json"
    assert grafana["/etc/grafana/provisioning"] == "./deploy/grafana/provisioning"


# --- Mosquitto --------------------------------------------------------------------------------


def mosquitto_conf() -> dict[str, list[str]]:
    conf: dict[str, list[str]] = {}
    for line in (DEPLOY / "mosquitto" / "mosquitto.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf.setdefault(key, []).append(value.strip())
    return conf


def test_mosquitto_files_live_in_what_compose_mounts() -> None:
    conf = mosquitto_conf()
    broker = mounts("mosquitto")
    assert broker["/mosquitto/config/mosquitto.conf"] == "./deploy/mosquitto/mosquitto.conf"
    for path in (*conf["password_file"], *conf["acl_file"], *conf["persistence_location"]):
        assert any(path.startswith(target) for target in broker), f"{path} is not mounted"
    init = mounts("mosquitto-init")
    assert init["/mosquitto/secrets"] == broker["/mosquitto/secrets"] == "mosquitto-secrets"
    assert service("mosquitto-init")["entrypoint"][-1] == conf["password_file"][0]


def test_mosquitto_refuses_anonymous_and_serves_websockets() -> None:
    conf = mosquitto_conf()
    assert conf["allow_anonymous"] == ["false"]
    assert conf["protocol"] == ["mqtt", "websockets"]
    listeners = [line.split()[0] for line in conf["listener"]]
    published = [p.split(":", 1)[1] for p in service("mosquitto")["ports"]]
    assert [f"{port}:{port}" for port in listeners] == [p.split()[0] for p in published]
    assert int(conf["max_queued_messages"][0]) >= 100_000


def test_the_ingest_role_lets_workers_make_and_read_every_subscription() -> None:
    """make-passwd.sh's `ingest` role (dynamic-security roles file) against the worker's filters."""
    script = (DEPLOY / "mosquitto" / "make-passwd.sh").read_text()
    role = script.split('{"rolename": "ingest", "acls"', 1)[1].split('{"rolename"', 1)[0]
    subscribable = re.findall(r"acl subscribePattern '(\S+)' true", role)
    readable = re.findall(r"acl publishClientReceive '(\S+)' true", role)
    settings = load_ingest_settings(DEPLOY / "ingest" / "pumpgw-ingest.toml")
    assert settings.mqtt.username == "ingest-1"
    for shared in subscriptions(settings.ingest.group, settings.mqtt.topic_prefix):
        assert any(topic_matches_sub(allowed, shared) for allowed in subscribable), shared
        topic = shared.split("/", 2)[2]
        assert any(topic_matches_sub(allowed, topic) for allowed in readable), topic


# --- Prometheus -------------------------------------------------------------------------------


def metric_names(tmp_path: Path) -> set[str]:
    """Every metric name the gateway exposes, with the real sinks' extra counters."""
    outbox = Outbox(tmp_path / "o.db", ["mqtt", "influx"])
    mqtt_sink = MqttSink(MqttSettings(), outbox, TopicBase("s", "st"), status=lambda: (b"", b""),
                         on_ack=lambda ack: None)  # fmt: skip
    influx = InfluxSettings(url="http://127.0.0.1:1", org="o")
    influx_sink = InfluxSink(influx, outbox, on_poison=lambda r, w: None, rng=random.Random(1))
    sinks = []
    for name, health in (("mqtt", mqtt_sink.health()), ("influx", influx_sink.health())):
        counters, gauges = dict.fromkeys(health.counters, 0), dict.fromkeys(health.gauges, 0)
        sinks.append(SinkObservation(name, True, 0, None, 0, None, counters, gauges))
    influx_sink.close()
    outbox.close()
    obs = Observation(
        uptime_s=1, frames_in=1, accepted_by_kind={"reading": 1}, quarantined_by_reason={"x": 1},
        duplicates=0, alert_transitions=0, acks_in=0, acks_rejected=0, outbox_pending=0,
        outbox_max_pending=1, outbox_full=False, outbox_free_disk_bytes=1,
        outbox_history_freed=0,
        sources=(SourceObservation("line", True, 0, 0, None),), sinks=tuple(sinks),
        pumps_total=1, pumps_telemetry_lost=0, max_backlog_age_s=300,
    )  # fmt: skip
    return {line.split()[2] for line in render_metrics(obs).splitlines() if line[:6] == "# TYPE"}


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "pumpgw-alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_alert_rules_use_only_metrics_the_gateway_exposes(tmp_path: Path) -> None:
    known = metric_names(tmp_path) | {"up"}
    for rule in alert_rules():
        used = set(re.findall(r"\b(pumpgw_[a-z_]+|up)\b(?=[{\[\s)=<>!]|$)", rule["expr"]))
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']}: unknown {used - known}"
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"]


def test_prometheus_loads_the_rules_compose_mounts() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    prometheus = mounts("prometheus")
    for path in config["rule_files"]:
        assert prometheus[path] == "./deploy/prometheus/pumpgw-alerts.yml"
    targets = {t for job in config["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]}  # fmt: skip
    assert {"gateway:9108", "ingest-1:9108", "ingest-2:9108"} == targets


# --- systemd and udev -------------------------------------------------------------------------


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def test_gateway_unit_is_hardened_and_runs_as_its_own_user() -> None:
    service_section = unit("pumpgw.service")["Service"]
    expected = {
        "User": "pumpgw",
        "SupplementaryGroups": "dialout",
        "StateDirectory": "pumpgw",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "ProtectHome": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "",
        "Restart": "always",
    }
    for key, value in expected.items():
        assert service_section.get(key) == value, key
    assert "Environment" not in service_section  # secrets come from EnvironmentFile only


def test_gateway_unit_starts_the_run_subcommand_with_the_installed_config() -> None:
    service_section = unit("pumpgw.service")["Service"]
    argv = shlex.split(service_section["ExecStart"])
    assert argv[0] == "/opt/pumpgw/bin/pumpgw"
    args = pumpgw_parser().parse_args(argv[1:])
    assert (args.command, str(args.config)) == ("run", "/etc/pumpgw/pumpgw.toml")
    check = shlex.split(service_section["ExecStartPre"])
    assert pumpgw_parser().parse_args(check[1:]).command == "check-config"
    assert str(args.config) in (ROOT / "docs" / "operations.md").read_text()
    example = load_settings(ROOT / "config" / "pumpgw.example.toml")
    assert example.store.path.parent == Path("/var/lib") / service_section["StateDirectory"]


def test_ingest_unit_template_runs_the_ingest_subcommand() -> None:
    service_section = unit("pumpgw-ingest@.service")["Service"]
    argv = shlex.split(service_section["ExecStart"])
    args = pumpgw_parser().parse_args(argv[1:])
    assert args.command == "ingest"
    assert "%i" in service_section["StateDirectory"]
    assert "NoNewPrivileges" in service_section


UDEV_KEY = re.compile(r'^(?P<key>[A-Z_]+)(\{[^}]+\})?(?P<op>==|!=|\+=|:=|=)"[^"]*"$')


def test_udev_rules_give_serial_bridges_a_stable_dialout_name() -> None:
    rules = [
        line
        for line in (DEPLOY / "udev" / "99-pumpgw.rules").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert rules
    for rule in rules:
        pairs = [p.strip() for p in rule.split(",")]
        assert all(UDEV_KEY.match(p) for p in pairs), rule
        assert 'SUBSYSTEM=="tty"' in pairs
        assert 'GROUP="dialout"' in pairs
        assert any(re.fullmatch(r'SYMLINK\+="pump-bridge-[a-z0-9-]+"', p) for p in pairs)


@pytest.mark.parametrize("name", ["pumpgw.service", "pumpgw-ingest@.service"])
def test_units_have_the_three_sections(name: str) -> None:
    assert {"Unit", "Service", "Install"} <= set(unit(name).sections())


def test_example_config_installs_with_the_units_paths() -> None:
    text = (ROOT / "config" / "pumpgw.example.toml").read_text()
    assert tomllib.loads(text)["store"]["path"] == "/var/lib/pumpgw/outbox.db"
