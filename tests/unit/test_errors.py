"""One exception root: every gateway error is a PumpgwError; the CLI maps each branch."""

from __future__ import annotations

import argparse
import importlib
import inspect
import pkgutil
from collections.abc import Callable

import pytest

import gateway
from gateway import cli
from gateway.config import ConfigError
from gateway.errors import PumpgwError, SinkError
from gateway.outbox import OutboxError
from gateway.records import GATEWAY_PUMP_ID, KINDS, PUMP_KINDS, RETAINED_KINDS
from gateway.topics import GATEWAY_LEAVES, PUMP_LEAVES, TopicBase, is_retained, topic_for


def gateway_exceptions() -> list[type[BaseException]]:
    """Every exception class defined in a module of the gateway package."""
    found: list[type[BaseException]] = []
    for info in pkgutil.walk_packages(gateway.__path__, "gateway."):
        module = importlib.import_module(info.name)
        for _, value in inspect.getmembers(module, inspect.isclass):
            if issubclass(value, BaseException) and value.__module__ == info.name:
                found.append(value)
    return found


def test_every_gateway_exception_derives_from_the_one_root() -> None:
    exceptions = gateway_exceptions()
    assert ConfigError in exceptions
    assert OutboxError in exceptions
    outside = [e.__qualname__ for e in exceptions if not issubclass(e, PumpgwError)]
    assert outside == []


def test_the_error_tree_in_the_docstring_names_every_class() -> None:
    import gateway.errors

    drawn = gateway.errors.__doc__ or ""
    missing = [e.__name__ for e in gateway_exceptions() if e.__name__ not in drawn]
    assert missing == []


def failing(exc: BaseException) -> Callable[[argparse.Namespace], int]:
    """A command that raises `exc`."""

    def raise_it(_args: argparse.Namespace) -> int:
        raise exc

    return raise_it


@pytest.mark.parametrize(
    ("exc", "code", "text"),
    [
        (ConfigError(["store.path: bad"]), 2, "configuration error: store.path: bad"),
        (OutboxError("cannot open the outbox"), 1, "pumpgw history failed: cannot open the outbox"),
        (SinkError("broker gone"), 1, "pumpgw history failed: broker gone"),
        (FileNotFoundError("no capture"), 1, "pumpgw history failed: no capture"),
        (KeyboardInterrupt(), 0, ""),
    ],
)
def test_cli_maps_each_branch_to_its_exit_code_and_message(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    exc: BaseException,
    code: int,
    text: str,
) -> None:
    monkeypatch.setattr(cli, "cmd_history", failing(exc))
    assert cli.main(["history", "--pump", "P1", "--store", "unused.db"]) == code
    assert text in capsys.readouterr().err


def test_cli_lets_a_bug_show_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "cmd_history", failing(ZeroDivisionError()))
    with pytest.raises(ZeroDivisionError):
        cli.main(["history", "--pump", "P1", "--store", "unused.db"])


def test_record_kinds_have_one_definition_that_topics_follow() -> None:
    assert set(PUMP_LEAVES) == PUMP_KINDS
    assert set(GATEWAY_LEAVES) < PUMP_KINDS
    base = TopicBase(site="s", station="w")
    assert {k for k in KINDS if is_retained(k)} == RETAINED_KINDS
    assert topic_for("alert", GATEWAY_PUMP_ID, base) == "pumpgw/s/w/gateway/alerts"
