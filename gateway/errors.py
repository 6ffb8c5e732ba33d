"""The gateway's exceptions: one root, so a caller can catch the project's errors and nothing else.

Pure: no imports. Each class lives beside the code that raises it; this tree is the map::

    PumpgwError                          gateway.errors
    ├── ConfigError                      gateway.config      settings invalid: exit code 2
    ├── OutboxError                      gateway.outbox      the SQLite outbox cannot work
    │   └── OutboxFullError              gateway.outbox      no room: readings wait (back-pressure)
    ├── SourceError                      gateway.adapters.serial_port   a line cannot be opened
    ├── SinkError                        gateway.errors      a sink cannot deliver
    │   ├── MqttError                    gateway.adapters.mqtt_client
    │   │   ├── MqttConfigError          unreadable password file, bad TLS files
    │   │   └── MqttRefusedError         the broker refused a CONNECT or a PUBLISH
    │   └── InfluxError                  gateway.adapters.influx
    │       ├── InfluxUnavailableError   worth retrying
    │       ├── InfluxRejectedError      the points themselves are refused
    │       ├── InfluxRefusedError       credentials, bucket, database: a person must act
    │       └── InfluxConfigError        the sink cannot start
    ├── StoppedError                     gateway.errors      stop was asked while waiting to retry
    ├── MosquittoMissingError            gateway.demo        the demo needs the mosquitto package
    └── DashboardError                   gateway.dashboard.server   the page cannot be served

The command line maps ConfigError to exit code 2 and every other PumpgwError to exit code 1,
each with one line on stderr (gateway.cli). Wire-level problems of the shared packages
(`schemas.codec.MessageError`, the simulator's errors) are data to the gateway, not failures:
they stay in their own packages, which do not depend on this one.
"""

from __future__ import annotations


class PumpgwError(Exception):
    """Root of every error the gateway raises on purpose; the message says what to check."""


class SinkError(PumpgwError):
    """A sink (MQTT, InfluxDB) cannot deliver; the message names the server and what to check."""


class StoppedError(PumpgwError):
    """The stop event was set while a sink was waiting to retry."""
