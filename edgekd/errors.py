"""The error hierarchy: every failure a user can cause or meet maps to one exit code."""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_STAGE_FAILED = 3


class EdgeKDError(Exception):
    """Base of all edgekd errors; the message names what went wrong and where."""

    exit_code = EXIT_STAGE_FAILED


class BadInputError(EdgeKDError):
    """The user's input (config, paths, data, model, checkpoint) is wrong: exit 2."""

    exit_code = EXIT_BAD_INPUT


class ConfigError(BadInputError):
    """A config file or key is missing, malformed or out of range."""


class DataError(BadInputError):
    """A dataset, calibration or eval array is missing, empty or malformed."""


class ModelError(BadInputError):
    """A model, checkpoint or ONNX file cannot be used."""


class StageError(EdgeKDError):
    """A pipeline stage failed on valid input: exit 3."""

    exit_code = EXIT_STAGE_FAILED


class BoardError(EdgeKDError):
    """A board could not be reached, authenticated or run: exit 3."""

    exit_code = EXIT_STAGE_FAILED


class RuntimeMissingError(BadInputError):
    """A backend's runtime is not installed; the message names the extra to install."""


class GateFailed(EdgeKDError):
    """One or more gates did not hold: exit 1."""

    exit_code = EXIT_GATE_FAILED
