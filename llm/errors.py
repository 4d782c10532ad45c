"""Errors raised while loading or running a model."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, or does not hold what the model needs."""
