"""relayd: an authenticated SMTP submission relay with a durable queue."""

__version__ = "0.1.0"
