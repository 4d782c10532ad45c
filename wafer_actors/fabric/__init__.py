"""Transports: how tiles are started and how their messages travel between processes."""

from .base import Transport
from .local import LocalTransport

__all__ = ["Transport", "LocalTransport"]
