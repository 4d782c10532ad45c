"""Errors raised while loading or running a model."""

from __future__ import annotations

from wafer_actors.errors import InputError


class CheckpointError(InputError, ValueError):
    """A checkpoint file is missing, unreadable, or does not hold what the model needs."""
