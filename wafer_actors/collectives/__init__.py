"""Protocols: per-core algorithms run as message passing between tiles."""

from .allreduce import allreduce, chain_allreduce
from .shift import shift

__all__ = ["allreduce", "chain_allreduce", "shift"]
