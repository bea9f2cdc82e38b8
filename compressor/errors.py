"""Errors a user can act on. Each message names the problem and the fix."""


class CompressorError(Exception):
    """Base class for every error this package raises on purpose."""


class UnsupportedModelError(CompressorError):
    """The model contains a module or op the compressor cannot slim exactly."""

    def __init__(self, message, module=None, op=None):
        super().__init__(message)
        self.module = module
        self.op = op


class ConfigError(CompressorError, ValueError):
    """A width configuration, side, budget or argument is malformed."""


class InfeasibleBudgetError(CompressorError, ValueError):
    """No configuration of the width space meets the budget."""
