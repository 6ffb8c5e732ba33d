"""The HL7 MLLP receiver and the FHIR endpoint of tests/receivers/ as private server processes.

Each runs from its script with this interpreter on a free loopback port, keeps what it
received in a SQLite file in its work directory (so it survives a restart on the same port),
and answers on demand through a control file (see each script's docstring).
"""

from __future__ import annotations

import json
import sqlite3
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.servers import ServerProcess, accepts_tcp, free_port

RECEIVERS = Path(__file__).parent / "receivers"


class ScriptServer(ServerProcess):
    """A Python script of tests/receivers as a server on one port."""

    name = "script"
    package = "python3"
    binary = sys.executable
    script = ""

    def __init__(self, workdir: Path, *, validate: bool = True) -> None:
        super().__init__(workdir)
        self.port = 0
        self.store = workdir / "received.db"
        self.control_file = workdir / "control.json"
        self.validate = validate

    def _choose_ports(self) -> None:
        self.port = free_port()

    def _write_config(self) -> None:
        self.control({})

    def _argv(self) -> list[str]:
        argv = [str(RECEIVERS / self.script), "--port", str(self.port)]
        argv += ["--store", str(self.store), "--control", str(self.control_file)]
        return argv + ([] if self.validate else ["--no-validate"])

    def _is_ready(self) -> bool:
        return accepts_tcp(self.port)

    def control(self, settings: dict[str, Any]) -> None:
        """Replace the answers-on-demand (read again for every message)."""
        partial = self.control_file.with_suffix(".tmp")
        partial.write_text(json.dumps(settings))
        partial.replace(self.control_file)

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.store.exists():
            return []
        db = sqlite3.connect(f"file:{self.store}?mode=ro", uri=True)
        try:
            return db.execute(sql).fetchall()
        except sqlite3.OperationalError:  # the table is not there yet
            return []
        finally:
            db.close()


@dataclass(frozen=True)
class Hl7Received:
    control_id: str
    message_type: str
    record_ids: tuple[str, ...]
    alert_id: str | None
    phase: str | None
    answer: str
    reason: str | None
    body: str


class MllpReceiver(ScriptServer):
    """tests/receivers/mllp_receiver.py: hl7apy-validated, answers AA unless told otherwise."""

    name = "mllp receiver"
    script = "mllp_receiver.py"

    def __init__(
        self, workdir: Path, *, validate: bool = True, tls: tuple[Path, Path, Path] | None = None
    ) -> None:
        """tls: (server certificate, its key, the CA client certificates must chain to)."""
        super().__init__(workdir, validate=validate)
        self.tls = tls

    def _argv(self) -> list[str]:
        if self.tls is None:
            return super()._argv()
        cert, key, client_ca = self.tls
        tls = ["--tls-cert", str(cert), "--tls-key", str(key), "--tls-client-ca", str(client_ca)]
        return [*super()._argv(), *tls]

    @property
    def url(self) -> str:
        scheme = "mllp" if self.tls is None else "mllps"
        return f"{scheme}://127.0.0.1:{self.port}"

    def messages(self) -> list[Hl7Received]:
        rows = self._rows(
            "SELECT control_id, message_type, record_ids, alert_id, phase, answer, reason, body "
            "FROM messages ORDER BY n"
        )
        return [
            Hl7Received(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6], r[7])
            for r in rows
        ]

    def accepted_ids(self) -> Counter[str]:
        """How often each record id arrived in a message answered AA."""
        return Counter(i for m in self.messages() if m.answer == "AA" for i in m.record_ids)


class FhirEndpoint(ScriptServer):
    """tests/receivers/fhir_endpoint.py: fhir.resources-validated transaction Bundles."""

    name = "fhir endpoint"
    script = "fhir_endpoint.py"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/fhir"

    def resources(self, kind: str) -> dict[str, dict[str, Any]]:
        """Stored resources of one type by identifier ('system|value'), oldest first."""
        rows = self._rows(
            f"SELECT identifier, body FROM resources WHERE type = '{kind}' ORDER BY rowid"  # noqa: S608
        )
        return {str(r[0]): json.loads(r[1]) for r in rows}

    def posted_ids(self) -> Counter[str]:
        """How often each record id arrived in a Bundle answered 200."""
        rows = self._rows("SELECT record_ids FROM posts WHERE status = 200")
        return Counter(i for r in rows for i in json.loads(r[0]))

    def record_ids(self, kind: str) -> set[str]:
        """Values of the record-id identifiers of stored resources of one type."""
        prefix = "urn:pumpgw:record-id|"
        return {k.removeprefix(prefix) for k in self.resources(kind) if k.startswith(prefix)}
