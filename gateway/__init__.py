"""pumpgw: the intrathecal pump telemetry gateway (secondary, informational notification only)."""

__version__ = "0.1.0"
