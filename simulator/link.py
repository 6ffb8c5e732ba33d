"""Transports that carry the simulator's bytes: a pty, a TCP server, a serial device, a file.

Each is a thin adapter that maps its library's errors to ours, here and nowhere else:

    SimulatorError     root of everything the simulator reports as a failure
    ├── LinkError      a transport could not be opened or bound (exit code 1)
    └── PeerLostError       the reader went away; its unacknowledged frames wait for the next one

`connect` waits (up to a timeout) for a reader; `send` writes everything or raises
PeerLostError; `receive` waits up to a timeout for bytes from the reader (acknowledgements).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import sys
import termios
import time
import tty
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, NoReturn, Protocol

import serial

log = logging.getLogger(__name__)

POLL_S: Final = 0.05
RECEIVE_BYTES: Final = 65_536
READER_SETTLE_S: Final = 0.25
"""Pause after a reader connects: pyserial's open() discards input that arrives before it
returns (reset_input_buffer on socket://, tcflush on a tty), and a reader that acks "up to
seq" would then cover the gap, so nothing is sent until its open() is surely done."""
CLOSE_LINGER_S: Final = 0.5
"""Wait before closing a connected line: pyserial's read() drops the bytes it has gathered
when it meets the end of the stream, so a reader gets time to collect the last write."""


class SimulatorError(Exception):
    """Root of the simulator's errors."""


class LinkError(SimulatorError):
    """A transport could not be opened."""


class PeerLostError(SimulatorError):
    """The reader closed the line or stopped being reachable."""


class Link(Protocol):
    announcement: str | None
    """What to print as the first line of stdout (device path or URL), if anything."""
    acks: bool
    """Whether a reader can send acknowledgements back over this link."""

    @property
    def connected(self) -> bool: ...

    def connect(self, timeout_s: float) -> bool: ...

    def send(self, data: bytes, give_up: Callable[[], bool]) -> None: ...

    def receive(self, timeout_s: float) -> bytes: ...

    def close(self) -> None: ...


class PtyLink:
    """A pseudo-terminal: readers open the printed slave path; frames go to the master."""

    acks = True

    def __init__(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation: the settings outlive this fd
        self.announcement: str | None = os.ttyname(slave)
        os.close(slave)  # so a reader's close shows as POLLHUP on the master
        os.set_blocking(master, False)
        self._fd = master
        self._connected = False

    @property
    def connected(self) -> bool:
        return self._connected

    def connect(self, timeout_s: float) -> bool:
        """Wait for a reader to open the slave; drop bytes a previous reader left unread."""
        deadline = time.monotonic() + timeout_s
        while self._hung_up():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            time.sleep(min(POLL_S, left))
        time.sleep(READER_SETTLE_S)
        termios.tcflush(self._fd, termios.TCIOFLUSH)
        self._connected = True
        return True

    def send(self, data: bytes, give_up: Callable[[], bool]) -> None:
        view = memoryview(data)
        while view:
            if self._hung_up():
                self._lost("the reader closed the pty")
            try:
                view = view[os.write(self._fd, view) :]
            except BlockingIOError:
                if give_up():
                    self._lost("stopping while the reader is not reading")
                self._poll(select.POLLOUT, POLL_S)
            except OSError as exc:
                self._lost(f"pty write failed: {exc}")

    def receive(self, timeout_s: float) -> bytes:
        self._poll(select.POLLIN, timeout_s)
        if self._hung_up():
            self._lost("the reader closed the pty")
        try:
            return os.read(self._fd, RECEIVE_BYTES)
        except BlockingIOError:
            return b""
        except OSError as exc:
            self._lost(f"pty read failed: {exc}")

    def close(self) -> None:
        deadline = time.monotonic() + CLOSE_LINGER_S
        while self._connected and not self._hung_up() and time.monotonic() < deadline:
            time.sleep(POLL_S)
        os.close(self._fd)

    def _hung_up(self) -> bool:
        return bool(self._poll(0, 0.0) & select.POLLHUP)

    def _poll(self, events: int, timeout_s: float) -> int:
        poller = select.poll()
        poller.register(self._fd, events)
        found = poller.poll(timeout_s * 1000)
        return found[0][1] if found else 0

    def _lost(self, why: str) -> NoReturn:
        self._connected = False
        raise PeerLostError(why)


class TcpLink:
    """A TCP server for one reader at a time (pyserial opens it as socket://host:port)."""

    acks = True

    def __init__(self, host: str, port: int) -> None:
        try:
            self._server = socket.create_server((host, port), backlog=4)
        except OSError as exc:
            raise LinkError(f"cannot listen on {host}:{port}: {exc}") from exc
        self._server.setblocking(False)
        bound_host, bound_port = self._server.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self.announcement: str | None = f"socket://{shown}:{bound_port}"
        self._sock: socket.socket | None = None

    @property
    def connected(self) -> bool:
        return self._sock is not None

    def connect(self, timeout_s: float) -> bool:
        readable, _, _ = select.select([self._server], [], [], timeout_s)
        if not readable:
            return False
        try:
            sock, peer = self._server.accept()
        except BlockingIOError:
            return False
        sock.setblocking(False)
        self._sock = sock
        log.info("reader connected from %s:%s", peer[0], peer[1])
        time.sleep(READER_SETTLE_S)
        return True

    def send(self, data: bytes, give_up: Callable[[], bool]) -> None:
        sock = self._require()
        view = memoryview(data)
        while view:
            try:
                view = view[sock.send(view) :]
            except BlockingIOError:
                if give_up():
                    self._lost("stopping while the reader is not reading")
                select.select([], [sock], [], POLL_S)
            except OSError as exc:
                self._lost(f"connection lost: {exc}")

    def receive(self, timeout_s: float) -> bytes:
        sock = self._require()
        readable, _, _ = select.select([sock], [], [], timeout_s)
        if not readable:
            return b""
        try:
            data = sock.recv(RECEIVE_BYTES)
        except BlockingIOError:
            return b""
        except OSError as exc:
            self._lost(f"connection lost: {exc}")
        if not data:
            self._lost("the reader closed the connection")
        return data

    def close(self) -> None:
        if self._sock is not None:
            self._linger(self._sock)
            self._sock.close()
            self._sock = None
        self._server.close()

    @staticmethod
    def _linger(sock: socket.socket) -> None:
        """Until the reader closes or CLOSE_LINGER_S passes (its acks are ignored now)."""
        deadline = time.monotonic() + CLOSE_LINGER_S
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([sock], [], [], left)
            try:
                if readable and not sock.recv(RECEIVE_BYTES):
                    return
            except BlockingIOError:
                continue
            except OSError:
                return

    def _require(self) -> socket.socket:
        if self._sock is None:
            raise PeerLostError("no reader connected")
        return self._sock

    def _lost(self, why: str) -> NoReturn:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        raise PeerLostError(why)


class SerialLink:
    """A real serial device (or any pyserial URL); reopened after an error."""

    acks = True

    def __init__(self, url: str, baud: int) -> None:
        self.announcement: str | None = None
        self._url = url
        self._baud = baud
        self._port: serial.SerialBase | None = None
        self._open()

    @property
    def connected(self) -> bool:
        return self._port is not None

    def connect(self, timeout_s: float) -> bool:
        try:
            self._open()
        except LinkError as exc:
            log.debug("serial reopen failed: %s", exc)
            time.sleep(timeout_s)
            return False
        return True

    def send(self, data: bytes, give_up: Callable[[], bool]) -> None:
        try:
            self._require().write(data)
        except (serial.SerialException, OSError) as exc:
            self._lost(f"serial write failed: {exc}")

    def receive(self, timeout_s: float) -> bytes:
        port = self._require()
        try:
            port.timeout = timeout_s
            data: bytes = port.read(1)
            if data:
                port.timeout = 0
                data += port.read(RECEIVE_BYTES)
        except (serial.SerialException, OSError) as exc:
            self._lost(f"serial read failed: {exc}")
        return data

    def close(self) -> None:
        if self._port is not None:
            self._port.close()
            self._port = None

    def _open(self) -> None:
        try:
            self._port = serial.serial_for_url(self._url, baudrate=self._baud, timeout=0)
        except (serial.SerialException, ValueError, OSError) as exc:
            raise LinkError(f"cannot open serial device {self._url}: {exc}") from exc

    def _require(self) -> serial.SerialBase:
        if self._port is None:
            raise PeerLostError("serial device not open")
        return self._port

    def _lost(self, why: str) -> NoReturn:
        self.close()
        raise PeerLostError(why)


class FileLink:
    """A capture file of raw frames (or stdout) for `pumpgw replay`; nobody acknowledges."""

    acks = False

    def __init__(self, path: Path | None) -> None:
        self.announcement: str | None = None
        try:
            self._file: BinaryIO = open(path, "wb") if path else sys.stdout.buffer  # noqa: SIM115
        except OSError as exc:
            raise LinkError(f"cannot write capture file {path}: {exc}") from exc
        self._owned = path is not None

    @property
    def connected(self) -> bool:
        return True

    def connect(self, timeout_s: float) -> bool:
        return True

    def send(self, data: bytes, give_up: Callable[[], bool]) -> None:
        try:
            self._file.write(data)
        except OSError as exc:  # a full disk or a closed stdout pipe is a failure, not a peer
            raise LinkError(f"cannot write frames: {exc}") from exc

    def receive(self, timeout_s: float) -> bytes:
        time.sleep(timeout_s)
        return b""

    def close(self) -> None:
        self._file.flush()
        if self._owned:
            self._file.close()


def parse_listen(text: str) -> tuple[str, int]:
    """'HOST:PORT' (IPv6 as [::1]:PORT) to a host and port; ValueError with the reason."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65_535:
        raise ValueError(f"expected HOST:PORT with a port from 0 to 65535, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)
