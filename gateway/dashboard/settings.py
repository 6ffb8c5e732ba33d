"""`[dashboard]`: where the ward page is served and which broker WebSocket URL it is told."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

DEFAULT_LISTEN = "127.0.0.1:8090"
DEFAULT_BROKER_WS_PORT = 9001
BROKER_URL = re.compile(r"^wss?://[^\s/?#@]+(:\d{1,5})?(/[^\s?#]*)?$")


class DashboardSettings(BaseModel):
    """The `[dashboard]` section of the gateway's configuration file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = Field(
        DEFAULT_LISTEN, description="host:port the page is served on (loopback by default)"
    )
    broker_url: str | None = Field(
        None,
        description="the broker's MQTT-over-WebSocket URL as the browser reaches it "
        f"(ws://host:port or wss://host:port); default: the page's host, port "
        f"{DEFAULT_BROKER_WS_PORT}, wss when the page is https",
    )
    scope: Literal["station", "site"] = Field(
        "station", description="show this gateway's station, or every station of its site"
    )
    ack_timeout_s: float = Field(
        10.0,
        gt=0,
        le=300,
        description="an acknowledgement without the gateway's receipt after this long is "
        "shown as not applied",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        if not re.match(r"^[^:\s]+:\d{1,5}$", value):
            raise ValueError("use host:port, e.g. 127.0.0.1:8090")
        return value

    @field_validator("broker_url")
    @classmethod
    def _websocket_url(cls, value: str | None) -> str | None:
        if value is not None and not BROKER_URL.match(value):
            raise ValueError(
                "use ws://host:port or wss://host:port, without user name, password or query "
                "(credentials are typed in at the page's login)"
            )
        return value
