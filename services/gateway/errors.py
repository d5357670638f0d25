"""One interceptor maps exceptions to gRPC status codes; handlers just raise.

It also turns requests that fail to parse (invalid UTF-8 in a string field, garbage bytes) into
INVALID_ARGUMENT instead of grpc's default INTERNAL, and checks the bearer token when one is set.

The token is checked from the metadata, before the body is parsed: an unauthenticated request's bytes are
dropped unparsed, so a peer without the token cannot make the server build large messages. Reflection is
behind the token like every service; health checking stays open (probes carry no token).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Callable

import grpc
from google.protobuf.message import DecodeError

from longbow.rag.codectx import errors as codectx_errors
from longbow.services.engine.errors import (
    CapacityError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    UnknownRequestError,
)

log = logging.getLogger(__name__)


class AuthError(Exception):
    """Missing or wrong bearer token."""


class NotFoundError(LookupError):
    """A named thing (session, document, file) does not exist."""


class WrongReplicaError(Exception):
    """The call names state (an edit session) that lives on another replica: FAILED_PRECONDITION, not
    retriable here; the client must send it to the replica that owns the state."""


_CODES: list[tuple[type[BaseException], grpc.StatusCode]] = [
    (codectx_errors.OutsideWorkspaceError, grpc.StatusCode.PERMISSION_DENIED),
    (codectx_errors.NotReadableError, grpc.StatusCode.PERMISSION_DENIED),
    (codectx_errors.PositionError, grpc.StatusCode.OUT_OF_RANGE),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnknownRequestError, grpc.StatusCode.NOT_FOUND),
    (NotFoundError, grpc.StatusCode.NOT_FOUND),
    (WrongReplicaError, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineStoppedError, grpc.StatusCode.UNAVAILABLE),
    (EngineError, grpc.StatusCode.UNAVAILABLE),  # a failed step: retriable
    (AuthError, grpc.StatusCode.UNAUTHENTICATED),
    (NotImplementedError, grpc.StatusCode.UNIMPLEMENTED),
    (asyncio.TimeoutError, grpc.StatusCode.DEADLINE_EXCEEDED),
    (DecodeError, grpc.StatusCode.INVALID_ARGUMENT),
    (UnicodeError, grpc.StatusCode.INVALID_ARGUMENT),
]


def status_for(exc: BaseException) -> grpc.StatusCode:
    for kind, code in _CODES:
        if isinstance(exc, kind):
            return code
    return grpc.StatusCode.INTERNAL


class _Malformed:
    """Stands in for a request whose bytes did not parse."""

    def __init__(self, error: Exception):
        self.error = error


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, auth_token: str = "", on_status: Callable[[str, grpc.StatusCode], None] | None = None):
        self.auth_token, self.on_status = auth_token, on_status or (lambda method, code: None)

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith("/grpc.health"):
            return handler
        method = details.method
        if not self._authorized(details.invocation_metadata):
            return self._refusal(handler, method)
        if details.method.startswith("/grpc.reflection"):
            return handler  # a bidirectional stream of its own; authorized above
        deserialize = _tolerant(handler.request_deserializer)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, method), deserialize, handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, method), deserialize, handler.response_serializer)
        return handler  # no client-streaming RPCs in the API

    def _refusal(self, handler, method: str):
        """A handler of the same shape that parses nothing and answers UNAUTHENTICATED."""

        async def refuse(request, context):
            await self._abort(context, method, AuthError("missing or invalid bearer token"))

        async def refuse_stream(request, context):
            await refuse(request, context)
            yield  # never reached: makes this an async generator, as streaming handlers are

        serialize = handler.response_serializer
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(refuse, _unparsed, serialize)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(refuse_stream, _unparsed, serialize)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(refuse, _unparsed, serialize)
        return grpc.stream_stream_rpc_method_handler(refuse_stream, _unparsed, serialize)

    def _authorized(self, metadata) -> bool:
        if not self.auth_token:
            return True
        value = dict(metadata or ()).get("authorization", "")
        return hmac.compare_digest(value.encode(), f"Bearer {self.auth_token}".encode())

    def _wrap_unary(self, behavior, method):
        async def call(request, context):
            try:
                _check(request)
                response = await behavior(request, context)
            except Exception as exc:
                await self._abort(context, method, exc)
            self.on_status(method, grpc.StatusCode.OK)
            return response

        return call

    def _wrap_stream(self, behavior, method):
        async def call(request, context):
            try:
                _check(request)
                async for response in behavior(request, context):
                    yield response
            except Exception as exc:
                await self._abort(context, method, exc)
            self.on_status(method, grpc.StatusCode.OK)

        return call

    async def _abort(self, context, method: str, exc: Exception):
        if isinstance(exc, grpc.aio.AbortError):
            raise exc
        code = status_for(exc)
        if code == grpc.StatusCode.INTERNAL:
            log.exception("unhandled error in %s", method)
            message = "internal error"
        else:
            message = str(exc) or type(exc).__name__
        self.on_status(method, code)
        await context.abort(code, message)


def _check(request) -> None:
    if isinstance(request, _Malformed):
        raise InvalidRequestError(f"malformed request: {request.error}")


def _unparsed(data: bytes) -> None:
    return None  # an unauthenticated body: dropped without building a message from it


def _tolerant(deserializer):
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as exc:  # invalid UTF-8 in a string field raises here
            return _Malformed(exc)

    return parse
