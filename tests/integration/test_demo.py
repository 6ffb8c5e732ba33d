"""`pumpgw demo` as a person runs it: in a terminal, stopped by Ctrl-C, SIGTERM or by closing
the terminal; in each case no child process (simulator, Mosquitto) outlives it."""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import demo
from gateway.cli import main

pytestmark = pytest.mark.integration

STARTED_MARK = b"Ctrl-C to stop"
FRAMES_MARK = b"frames "
WAIT_S = 60.0
EXIT_S = 30.0


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc (children, their children, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class TerminalDemo:
    """`pumpgw demo` on the far side of a pseudo-terminal, as if typed into one."""

    def __init__(self, pid: int, master_fd: int) -> None:
        self.pid = pid
        self.master_fd: int | None = master_fd
        self.output = b""
        self.children: set[int] = set()
        """Processes seen under the demo, killed after the test whatever happened."""

    def read_until(self, mark: bytes, timeout_s: float = WAIT_S) -> bool:
        """Read the terminal until `mark` shows, the demo closes it, or the time is up."""
        deadline = time.monotonic() + timeout_s
        while mark not in self.output and time.monotonic() < deadline:
            if not self._read_some(deadline - time.monotonic()):
                return mark in self.output
        return mark in self.output

    def read_to_end(self, timeout_s: float = EXIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self._read_some(deadline - time.monotonic()):
            pass

    def _read_some(self, timeout_s: float) -> bool:
        assert self.master_fd is not None
        ready, _, _ = select.select([self.master_fd], [], [], max(0.0, timeout_s))
        if not ready:
            return True
        try:
            chunk = os.read(self.master_fd, 65536)
        except OSError:  # EIO: every process holding the terminal has closed it
            return False
        self.output += chunk
        return bool(chunk)

    def close_terminal(self) -> None:
        assert self.master_fd is not None
        os.close(self.master_fd)
        self.master_fd = None

    def wait_exit(self, timeout_s: float = EXIT_S) -> int | None:
        """The demo's exit status, or None if it is still running after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid == self.pid:
                return os.waitstatus_to_exitcode(status)
            time.sleep(0.05)
        return None

    def text(self) -> str:
        return self.output.decode(errors="replace")


@contextlib.contextmanager
def demo_in_a_terminal(workdir: Path, *args: str) -> Iterator[TerminalDemo]:
    argv = [sys.executable, "-m", "gateway.cli", "demo", "--pumps", "3", "--workdir", str(workdir)]
    pid, master_fd = pty.fork()
    if pid == 0:  # the child: exec at once (the test process has threads)
        os.execv(sys.executable, [*argv, *args])  # noqa: S606 - no shell: argv as given
    terminal = TerminalDemo(pid, master_fd)
    try:
        yield terminal
    finally:
        left = terminal.children | descendants(pid)
        if terminal.master_fd is not None:
            os.close(terminal.master_fd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        for child in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


def running_children(terminal: TerminalDemo) -> set[int]:
    """The demo's simulator and Mosquitto, once both run."""
    children = descendants(terminal.pid)
    terminal.children |= children
    assert len(children) >= 2, f"expected a simulator and a broker under the demo: {children}"
    return children


def survivors(children: set[int]) -> list[int]:
    deadline = time.monotonic() + 5.0  # exited children may take a moment to leave /proc
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.05)
    return sorted(pid for pid in children if alive(pid))


def test_closing_the_terminal_stops_the_demo_and_every_child(tmp_path: Path) -> None:
    with demo_in_a_terminal(tmp_path / "demo") as terminal:
        assert terminal.read_until(STARTED_MARK), terminal.text()
        children = running_children(terminal)

        terminal.close_terminal()

        assert terminal.wait_exit() is not None, "the demo outlived its terminal"
    assert survivors(children) == []


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_a_clean_stop_stops_every_child_and_warns_of_nothing(tmp_path: Path, how: str) -> None:
    with demo_in_a_terminal(tmp_path / "demo", "--no-view") as terminal:
        assert terminal.read_until(STARTED_MARK), terminal.text()
        assert terminal.read_until(FRAMES_MARK), terminal.text()
        children = running_children(terminal)

        if how == "ctrl-c":
            assert terminal.master_fd is not None
            os.write(terminal.master_fd, b"\x03")  # the terminal turns it into SIGINT
        else:
            os.kill(terminal.pid, signal.SIGTERM)
        terminal.read_to_end()
        code = terminal.wait_exit()

    assert code == 0, terminal.text()
    assert survivors(children) == []
    text = terminal.text()
    assert "stopping cleanly" in text
    assert "reconnect" not in text.lower(), text
    assert " WARNING " not in text, text
    assert " ERROR " not in text, text


def test_without_mosquitto_the_demo_names_the_package_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no mosquitto on it
    monkeypatch.setattr(demo, "MOSQUITTO_PATHS", ())
    before = descendants(os.getpid())

    code = main(["demo", "--no-view", "--duration", "5", "--workdir", str(tmp_path / "demo")])

    assert code == 1
    error = capsys.readouterr().err
    assert "install the Debian package 'mosquitto'" in error
    assert descendants(os.getpid()) == before
