"""relayd: a relay daemon between HTTP API clients and WebSocket agents."""

__version__ = "0.1.0"
