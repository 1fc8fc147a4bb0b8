"""Exceptions raised by freezeasguard.

Every error names what was wrong and where (file, column, tensor), because the people who hit them are
running long jobs on their own data and need to fix the input, not read a traceback.
"""

from __future__ import annotations


class FreezeAsGuardError(Exception):
    """Base class of every error this library raises on purpose."""


class DataError(FreezeAsGuardError, ValueError):
    """A dataset on disk is missing, malformed or does not match what was asked (file, column, caption)."""


class ModelError(FreezeAsGuardError, ValueError):
    """A model directory or weight file cannot be used (missing component, unsupported class, bad format)."""


class CheckpointError(FreezeAsGuardError, ValueError):
    """A training checkpoint cannot be resumed (corrupt, from another run, or for other tensors)."""


class DivergedError(FreezeAsGuardError, FloatingPointError):
    """Training produced a non-finite loss or gradient; the step was not taken (weights and checkpoints intact)."""
