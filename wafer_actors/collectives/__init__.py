"""Protocols: per-core algorithms run as message passing between tiles."""

from .chain_allreduce import chain_allreduce
from .shift import shift

__all__ = ["chain_allreduce", "shift"]
