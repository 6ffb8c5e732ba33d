"""What the HTTP sinks (adapters/influx.py, adapters/fhir_rest.py) share: the base URL check,
the owner-only secret file check and the urllib3 pool (no retries of its own, TLS as set)."""

from __future__ import annotations

import stat
from pathlib import Path
from urllib.parse import urlsplit

import urllib3
from pydantic import SecretStr


def http_base_url(value: str, *, example: str, credentials_go: str) -> str:
    """`value` without a trailing slash; ValueError unless http(s) with a host and no user."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"use {example}")
    if parts.username or parts.password:
        raise ValueError(f"put {credentials_go}, not in the URL")
    return value.rstrip("/")


def check_secret_file(path: Path | None) -> Path | None:
    """`path` if it is a regular file only its owner may read; ValueError says how to fix it."""
    if path is None:
        return None
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path} is not a regular file")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable by group or others; run: chmod 600 {path}")
    return path


def read_secret_file(value: SecretStr | None, path: Path | None) -> str | None:
    """A secret from its setting (environment) or else its owner-only file; ValueError or
    OSError says what is wrong with the file."""
    if value is not None:
        return value.get_secret_value()
    if path is None:
        return None
    check_secret_file(path)
    return path.read_text(encoding="utf-8").strip()


def http_pool(timeout_s: float, verify_tls: bool, ca_file: Path | None) -> urllib3.PoolManager:
    """One connection, no retries (the sink retries), the certificate checked unless told not."""
    return urllib3.PoolManager(
        num_pools=1,
        maxsize=1,
        retries=False,
        timeout=urllib3.Timeout(total=timeout_s),
        cert_reqs="CERT_REQUIRED" if verify_tls else "CERT_NONE",
        ca_certs=str(ca_file) if ca_file else None,
    )
