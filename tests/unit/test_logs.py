"""`--log-format json`: one JSON object per line with time, level, logger, message, extras."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from datetime import datetime

from gateway.logs import JsonFormatter


def record(**extra: object) -> logging.LogRecord:
    rec = logging.LogRecord(
        "gateway.service", logging.WARNING, __file__, 1, "line %s: %d", ("a", 3), None
    )
    for key, value in extra.items():
        setattr(rec, key, value)
    return rec


def test_a_record_is_one_json_object_with_the_standard_fields() -> None:
    line = JsonFormatter().format(record())
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["level"] == "warning"
    assert entry["logger"] == "gateway.service"
    assert entry["message"] == "line a: 3"
    assert datetime.fromisoformat(entry["time"]).utcoffset() is not None
    assert "args" not in entry
    assert "msg" not in entry


def test_extra_fields_are_kept_and_unserialisable_values_become_text() -> None:
    entry = json.loads(JsonFormatter().format(record(pump_id="P1", seq=7, where=object)))
    assert entry["pump_id"] == "P1"
    assert entry["seq"] == 7
    assert entry["where"] == "<class 'object'>"


def test_an_exception_is_inside_the_object_not_on_following_lines() -> None:
    try:
        raise ValueError("bad\nframe")
    except ValueError:
        rec = record()
        rec.exc_info = sys.exc_info()
    line = JsonFormatter().format(rec)
    assert "\n" not in line
    assert "ValueError: bad" in json.loads(line)["exception"]


def test_the_cli_writes_json_lines_to_stderr_with_log_format_json() -> None:
    script = (
        "import logging\n"
        "from gateway.cli import _configure_logging, build_parser\n"
        "args = build_parser().parse_args(['--log-format', 'json', 'demo'])\n"
        "_configure_logging(False, args.log_format)\n"
        "logging.getLogger('pumpgw').info('started %s', 'ok', extra={'station': 'ward-1'})\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    entry = json.loads(done.stderr.strip())
    assert entry["message"] == "started ok"
    assert entry["station"] == "ward-1"
    assert entry["logger"] == "pumpgw"
    assert entry["level"] == "info"
