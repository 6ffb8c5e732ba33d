"""A test FHIR R4 endpoint: transaction Bundles validated by fhir.resources (R4B), stored in SQLite.

Run as its own process (tests/interop_servers.py starts it):

    python tests/receivers/fhir_endpoint.py --port 8080 --store fhir.db --control control.json

POST / takes a transaction Bundle. The Bundle and every resource in it are validated with
fhir.resources' R4B models (a failure answers 400 with an OperationOutcome). Conditional
creates (`ifNoneExist: identifier=system|value`) create nothing when a resource of that type
already has the identifier; conditional updates (PUT Type?identifier=...) replace it. The
whole Bundle is one SQLite transaction, so a restart never leaves half of one. The control
file (re-read for every request) answers on demand:

    {"reject": {"<record id>": 422}, "transient": {"<record id>": 2}, "token": "secret"}

"reject": a Bundle carrying a record id that matches the pattern (fnmatch) gets that status
with an OperationOutcome;
"transient": answered 503 that many times first; "token": the bearer token required.
`--no-validate` skips fhir.resources (for benchmarks, which measure the sender).
"""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from tests.receivers.common import Control, argument_parser, open_store

SCHEMA = """
CREATE TABLE IF NOT EXISTS resources (
    type TEXT NOT NULL,
    identifier TEXT NOT NULL,
    body TEXT NOT NULL,
    versions INTEGER NOT NULL DEFAULT 1,
    PRIMARY KEY (type, identifier)
);
CREATE TABLE IF NOT EXISTS posts (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    record_ids TEXT NOT NULL,
    status INTEGER NOT NULL,
    created INTEGER NOT NULL,
    existing INTEGER NOT NULL,
    received_at REAL NOT NULL
);
"""
RECORD_SYSTEM = "urn:pumpgw:record-id"


def outcome(status: int, text: str) -> tuple[int, dict[str, Any]]:
    issue = {"severity": "error", "code": "processing", "diagnostics": text}
    return status, {"resourceType": "OperationOutcome", "issue": [issue]}


def validate(raw: bytes) -> str | None:
    """None when the Bundle and every resource in it are valid R4B, else the reason."""
    try:
        bundle = Bundle.model_validate_json(raw)
        if bundle.type != "transaction":
            return f"Bundle.type is {bundle.type}, expected transaction"
        for entry in json.loads(raw).get("entry", []):
            resource = entry["resource"]
            get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    except Exception as exc:  # noqa: BLE001 - pydantic and fhir_core raise several types
        return f"fhir.resources R4B: {type(exc).__name__}: {str(exc)[:400]}"
    return None


def record_ids(bundle: dict[str, Any]) -> list[str]:
    ids = []
    for entry in bundle.get("entry", []):
        for identifier in entry["resource"].get("identifier", []):
            if identifier.get("system") == RECORD_SYSTEM:
                ids.append(identifier["value"])
    return ids


def search_key(query: str) -> str:
    """'identifier=system|value' -> 'system|value'."""
    name, _, value = query.partition("=")
    if name != "identifier":
        raise ValueError(f"only identifier searches are supported, not {query!r}")
    return unquote(value)


class Store:
    def __init__(self, path: Path, control: Path | None, validating: bool) -> None:
        self.db = open_store(path, SCHEMA, check_same_thread=False)
        self.lock = threading.Lock()
        self.control = Control(control)
        self.validating = validating

    def post(self, raw: bytes, authorization: str | None) -> tuple[int, dict[str, Any]]:
        control = self.control.read()
        token = control.get("token")
        if token and authorization != f"Bearer {token}":
            return 401, {"resourceType": "OperationOutcome", "issue": []}
        reason = validate(raw) if self.validating else None
        if reason is not None:
            return outcome(400, reason)
        bundle = json.loads(raw)
        ids = record_ids(bundle)
        asked = self.control.on_demand(control, ids)
        if asked is not None and asked.code:
            return outcome(int(asked.code), f"rejected on demand: {asked.record_id}")
        if asked is not None:
            return outcome(503, f"busy on demand: {asked.record_id}")
        with self.lock:
            return self._commit(bundle, ids)

    def _commit(self, bundle: dict[str, Any], ids: list[str]) -> tuple[int, dict[str, Any]]:
        created = existing = 0
        responses = []
        self.db.execute("BEGIN IMMEDIATE")
        try:
            for entry in bundle.get("entry", []):
                resource, request = entry["resource"], entry["request"]
                kind = resource["resourceType"]
                if request["method"] == "PUT":
                    key = search_key(request["url"].partition("?")[2])
                    self.db.execute(
                        "INSERT INTO resources (type, identifier, body) VALUES (?, ?, ?) "
                        "ON CONFLICT (type, identifier) DO UPDATE SET body = excluded.body, "
                        "versions = versions + 1",
                        (kind, key, json.dumps(resource)),
                    )
                    responses.append({"response": {"status": "200 OK"}})
                    continue
                key = search_key(request["ifNoneExist"])
                found = self.db.execute(
                    "SELECT 1 FROM resources WHERE type = ? AND identifier = ?", (kind, key)
                ).fetchone()
                if found:
                    existing += 1
                    responses.append({"response": {"status": "200 OK"}})
                else:
                    created += 1
                    self.db.execute(
                        "INSERT INTO resources (type, identifier, body) VALUES (?, ?, ?)",
                        (kind, key, json.dumps(resource)),
                    )
                    responses.append({"response": {"status": "201 Created"}})
            self.db.execute(
                "INSERT INTO posts (record_ids, status, created, existing, received_at) "
                "VALUES (?, 200, ?, ?, ?)",
                (json.dumps(ids), created, existing, time.time()),
            )
            self.db.execute("COMMIT")
        except (sqlite3.Error, KeyError, ValueError) as exc:
            self.db.execute("ROLLBACK")
            return outcome(400, f"cannot store the Bundle: {exc}")
        return 200, {"resourceType": "Bundle", "type": "transaction-response", "entry": responses}


def handler_for(store: Store) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        disable_nagle_algorithm = True  # headers and body go out as two writes

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            status, body = store.post(raw, self.headers.get("Authorization"))
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/fhir+json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


def main() -> int:
    args = argument_parser(__doc__.splitlines()[0]).parse_args()
    store = Store(args.store, args.control, not args.no_validate)
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler_for(store))
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server.shutdown).start())
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()
    server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
