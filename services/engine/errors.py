"""Engine exceptions: one type per kind of bad input, so the gateway can map each to a gRPC status.

INVALID_ARGUMENT <- InvalidRequestError, PromptTooLongError (a subclass), NOT_FOUND <- UnknownRequestError,
RESOURCE_EXHAUSTED <- CapacityError, UNAVAILABLE <- EngineStoppedError.
"""


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class InvalidRequestError(EngineError, ValueError):
    """The request is malformed: empty prompt, bad sampling values, token ids out of range."""


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus requested output) exceeds the model's context or the KV capacity."""


class UnknownRequestError(EngineError, KeyError):
    """No request with this id is known to the engine."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "unknown request"


class CapacityError(EngineError):
    """The engine's queue is full; the caller may retry later."""


class EngineStoppedError(EngineError):
    """The engine was shut down or its worker failed; retriable on another replica."""
