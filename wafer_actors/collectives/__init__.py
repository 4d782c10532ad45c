"""Protocols: per-core algorithms run as message passing between tiles."""

from .allreduce import allreduce, chain_allreduce
from .mesh_gemv import mesh_gemv
from .shift import shift

__all__ = ["allreduce", "chain_allreduce", "mesh_gemv", "shift"]
