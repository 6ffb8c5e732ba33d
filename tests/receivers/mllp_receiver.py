"""A test MLLP receiver: hl7's asyncio MLLP server, hl7apy v2.6 validation, a SQLite log.

Run as its own process (tests/interop_servers.py starts it):

    python tests/receivers/mllp_receiver.py --port 2575 --store store.db --control control.json

Every message is parsed and validated by hl7apy against the HL7 v2.6 message structure
(strict). hl7apy 1.3.5 has no ORU_R40 structure; IHE PCD-04's ORU_R40 uses the segment
grammar of ORU_R01, so PCD-04 messages are validated against that. A message that fails is
answered AR with hl7apy's reason. The control file (re-read for every message) makes the
receiver answer on demand:

    {"reject": {"<record id>": "AR"}, "transient": {"<record id>": 2}}

"reject": any message carrying a record id that matches the pattern (fnmatch) gets that code
(AR or AE) every time;
"transient": answered AE that many times, then normally. Every message is logged with its
answer; `--no-validate` skips hl7apy (for benchmarks, which measure the sender). With
--tls-cert and --tls-key it speaks MLLP over TLS, and with --tls-client-ca it requires a
client certificate signed by that CA.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import hl7
from hl7.mllp import start_hl7_server
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a script
from tests.receivers.common import Control, argument_parser, open_store

SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    control_id TEXT NOT NULL,
    message_type TEXT NOT NULL,
    record_ids TEXT NOT NULL,
    alert_id TEXT,
    phase TEXT,
    answer TEXT NOT NULL,
    reason TEXT,
    body TEXT NOT NULL,
    received_at REAL NOT NULL
);
"""
PHASE_CODE = "68481"


def validate(text: str) -> str | None:
    """None when hl7apy accepts the message as v2.6, else its reason."""
    structure_text = text.replace("|ORU^R40^ORU_R40|", "|ORU^R40^ORU_R01|", 1)
    try:
        message = parse_message(
            structure_text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True
        )
        if message.version != "2.6":
            return f"version {message.version}, expected 2.6"
        message.validate()
    except Exception as exc:  # noqa: BLE001 - hl7apy raises many types; each is a refusal
        return f"hl7apy: {type(exc).__name__}: {exc}"
    return None


def describe(text: str) -> dict[str, Any]:
    """Control id, type, carried record ids, and for PCD-04 the alert id and phase (read by
    splitting on the delimiters: hl7apy has validated the message, or validation is off)."""
    segments = [s.split("|") for s in text.split("\r") if s]
    msh = segments[0]
    message_type = msh[8]
    obrs = [s for s in segments if s[0] == "OBR"]
    alert_id = phase = None
    if message_type.startswith("ORU^R40"):
        record_ids = [obr[2].split("^")[0] for obr in obrs]
        alert_id = obrs[0][3].split("^")[0] if obrs else None
        for obx in (s for s in segments if s[0] == "OBX"):
            if obx[3].split("^")[0] == PHASE_CODE:
                phase = obx[5]
    else:
        record_ids = [obr[3].split("^")[0] for obr in obrs]
    return {
        "control_id": msh[9],
        "message_type": message_type,
        "record_ids": record_ids,
        "alert_id": alert_id,
        "phase": phase,
    }


class Receiver:
    def __init__(self, store: Path, control: Path | None, validating: bool) -> None:
        self.db = open_store(store, SCHEMA)
        self.control = Control(control)
        self.validating = validating

    def answer(self, text: str) -> tuple[str, str, dict[str, Any]]:
        """(ack code, reason, description) for one message."""
        info = describe(text)
        reason = validate(text) if self.validating else None
        if reason is not None:
            return "AR", reason, info
        asked = self.control.on_demand(self.control.read(), info["record_ids"])
        if asked is not None and asked.code:
            return str(asked.code), f"rejected on demand: {asked.record_id}", info
        if asked is not None:
            return "AE", f"busy on demand: {asked.record_id}", info
        return "AA", "", info

    def log(self, text: str, code: str, reason: str, info: dict[str, Any]) -> None:
        self.db.execute(
            "INSERT INTO messages (control_id, message_type, record_ids, alert_id, phase, answer,"
            " reason, body, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                info["control_id"],
                info["message_type"],
                json.dumps(info["record_ids"]),
                info["alert_id"],
                info["phase"],
                code,
                reason,
                text,
                time.time(),
            ),
        )

    async def serve(self, reader: Any, writer: Any) -> None:
        try:
            while not writer.is_closing():
                block = await reader.readblock()
                text = block.decode("utf-8")
                code, reason, info = self.answer(text)
                self.log(text, code, reason, info)
                msh = text.split("\r", 1)[0]  # hl7 builds the ACK from the MSH alone
                ack = hl7.parse(msh).create_ack(ack_code=code, application="RECEIVER")
                ack_text = str(ack)
                if reason:
                    ack_text = ack_text.rstrip("\r") + "|" + reason.replace("|", " ")[:200]
                writer.writeblock(ack_text.encode("utf-8"))
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass
        finally:
            writer.close()


def tls_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    """MLLP over TLS with --tls-cert/--tls-key; --tls-client-ca also requires a client cert."""
    if args.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(args.tls_cert, args.tls_key)
    if args.tls_client_ca is not None:
        context.load_verify_locations(args.tls_client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


async def main_async(args: argparse.Namespace) -> None:
    receiver = Receiver(args.store, args.control, not args.no_validate)
    server = await start_hl7_server(
        receiver.serve,
        "127.0.0.1",
        args.port,
        limit=64 * 1024 * 1024,
        encoding="utf-8",
        ssl=tls_context(args),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    print(f"listening on 127.0.0.1:{args.port}", flush=True)
    async with server:
        await stop.wait()


def main() -> int:
    parser = argument_parser(__doc__.splitlines()[0])
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-client-ca", type=Path)
    asyncio.run(main_async(parser.parse_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
