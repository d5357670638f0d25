"""The gateway's one error interceptor (services/gateway/errors.py) on its own: the exception -> status
table, and the interceptor on a real gRPC server over a socket in front of a stand-in service (no model):
messages kept or hidden, malformed bytes, the bearer token, health left open, the status callback.
Fast: the mutation check (scripts/mutation.sh) runs it for every mutant of errors.py."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.protobuf.message import DecodeError

from longbow.v1 import sessions_pb2 as pb
from longbow.rag.codectx import errors as codectx_errors
from longbow.services.engine.errors import (
    CapacityError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    UnknownRequestError,
)
from longbow.services.gateway.errors import (
    AuthError,
    ErrorInterceptor,
    NotFoundError,
    WrongReplicaError,
    status_for,
)

S = grpc.StatusCode


@pytest.mark.parametrize("exc, code", [
    (codectx_errors.OutsideWorkspaceError("x"), S.PERMISSION_DENIED),
    (codectx_errors.NotReadableError("x"), S.PERMISSION_DENIED),
    (codectx_errors.PositionError("x"), S.OUT_OF_RANGE),
    (InvalidRequestError("x"), S.INVALID_ARGUMENT),
    (PromptTooLongError("x"), S.INVALID_ARGUMENT),  # a subclass: EngineError (UNAVAILABLE) must not win
    (UnknownRequestError("x"), S.NOT_FOUND),  # also an EngineError and a KeyError
    (NotFoundError("x"), S.NOT_FOUND),
    (WrongReplicaError("x"), S.FAILED_PRECONDITION),
    (CapacityError("x"), S.RESOURCE_EXHAUSTED),
    (EngineStoppedError("x"), S.UNAVAILABLE),
    (EngineError("x"), S.UNAVAILABLE),
    (AuthError("x"), S.UNAUTHENTICATED),
    (NotImplementedError("x"), S.UNIMPLEMENTED),
    (asyncio.TimeoutError(), S.DEADLINE_EXCEEDED),
    (DecodeError("x"), S.INVALID_ARGUMENT),
    (UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), S.INVALID_ARGUMENT),
    (ValueError("x"), S.INTERNAL),  # a plain ValueError is a bug, not the client's fault
    (KeyError("x"), S.INTERNAL),  # nor is a plain KeyError a NOT_FOUND
    (RuntimeError("x"), S.INTERNAL),
])
def test_status_for(exc, code):
    assert status_for(exc) == code


SERVICE = "test.Stand"


def _stand_in_handlers():
    """Unary `Say` and streaming `Many`: the session_id says what to do (ok, or raise one error)."""
    raised = {"invalid": InvalidRequestError("cursor 9 is past the end"),
              "boom": RuntimeError("secret detail"), "capacity": CapacityError("")}

    async def say(request, context):
        if request.session_id in raised:
            raise raised[request.session_id]
        return pb.PredictResponse(text=f"said {request.session_id}")

    async def many(request, context):
        for i in range(3):
            yield pb.PredictResponse(text=str(i))
            if request.session_id in raised:
                raise raised[request.session_id]

    methods = {
        "Say": grpc.unary_unary_rpc_method_handler(say, pb.PredictRequest.FromString,
                                                   pb.PredictResponse.SerializeToString),
        "Many": grpc.unary_stream_rpc_method_handler(many, pb.PredictRequest.FromString,
                                                     pb.PredictResponse.SerializeToString),
    }
    health = {"Check": grpc.unary_unary_rpc_method_handler(say, pb.PredictRequest.FromString,
                                                           pb.PredictResponse.SerializeToString)}
    return [grpc.method_handlers_generic_handler(SERVICE, methods),
            grpc.method_handlers_generic_handler("grpc.health.v1.Health", health)]


def _serve_and_call(calls, auth_token: str = ""):
    """Starts a server with the interceptor, runs `calls(channel)`, returns (its result, statuses seen)."""
    seen: list[tuple[str, grpc.StatusCode]] = []

    async def run():
        interceptor = ErrorInterceptor(auth_token, on_status=lambda method, code: seen.append((method, code)))
        server = grpc.aio.server(interceptors=[interceptor])
        server.add_generic_rpc_handlers(_stand_in_handlers())
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                return await calls(channel)
        finally:
            await server.stop(0)

    return asyncio.run(run()), seen


async def _say(channel, session_id="ok", metadata=None, raw: bytes | None = None):
    """(code, details or text) of one unary call; `raw` sends those bytes as the request."""
    serializer = (lambda _: raw) if raw is not None else pb.PredictRequest.SerializeToString
    call = channel.unary_unary(f"/{SERVICE}/Say", request_serializer=serializer,
                               response_deserializer=pb.PredictResponse.FromString)
    try:
        response = await call(pb.PredictRequest(session_id=session_id), metadata=metadata, timeout=10)
        return S.OK, response.text
    except grpc.aio.AioRpcError as err:
        return err.code(), err.details()


async def _many(channel, session_id="ok", raw: bytes | None = None):
    serializer = (lambda _: raw) if raw is not None else pb.PredictRequest.SerializeToString
    call = channel.unary_stream(f"/{SERVICE}/Many", request_serializer=serializer,
                                response_deserializer=pb.PredictResponse.FromString)
    got = []
    try:
        async for response in call(pb.PredictRequest(session_id=session_id), timeout=10):
            got.append(response.text)
        return S.OK, got
    except grpc.aio.AioRpcError as err:
        return err.code(), got


def test_interceptor_maps_errors_and_keeps_or_hides_messages():
    async def calls(channel):
        return [await _say(channel, "ok"), await _say(channel, "invalid"), await _say(channel, "boom"),
                await _say(channel, "capacity")]

    results, seen = _serve_and_call(calls)
    assert results == [(S.OK, "said ok"),
                       (S.INVALID_ARGUMENT, "cursor 9 is past the end"),  # the client's mistake, said plainly
                       (S.INTERNAL, "internal error"),  # a bug's details stay in the server log
                       (S.RESOURCE_EXHAUSTED, "CapacityError")]  # an empty message: the type's name
    method = f"/{SERVICE}/Say"
    assert seen == [(method, S.OK), (method, S.INVALID_ARGUMENT), (method, S.INTERNAL),
                    (method, S.RESOURCE_EXHAUSTED)]


def test_interceptor_on_streams():
    async def calls(channel):
        return [await _many(channel, "ok"), await _many(channel, "invalid")]

    results, seen = _serve_and_call(calls)
    assert results == [(S.OK, ["0", "1", "2"]), (S.INVALID_ARGUMENT, ["0"])]  # what was sent before the error
    assert [code for _, code in seen] == [S.OK, S.INVALID_ARGUMENT]


def test_malformed_bytes_are_invalid_argument_not_internal():
    async def calls(channel):
        bad_utf8 = b"\x0a\x02\xff\xfe"  # field 1 (a string) holding invalid UTF-8
        garbage = b"\xff\xff\xff"
        unary = [await _say(channel, raw=bad_utf8), await _say(channel, raw=garbage)]
        return unary, await _many(channel, raw=garbage)

    (unary, stream), _ = _serve_and_call(calls)
    assert [code for code, _ in unary] == [S.INVALID_ARGUMENT, S.INVALID_ARGUMENT]
    assert all(details.startswith("malformed request") for _, details in unary)
    assert stream == (S.INVALID_ARGUMENT, [])  # refused before the handler ran: nothing streamed


def test_bearer_token_checked_and_health_left_open():
    async def calls(channel):
        health = channel.unary_unary("/grpc.health.v1.Health/Check",
                                     request_serializer=pb.PredictRequest.SerializeToString,
                                     response_deserializer=pb.PredictResponse.FromString)
        return [await _say(channel), await _say(channel, metadata=(("authorization", "Bearer wrong"),)),
                await _say(channel, metadata=(("authorization", "s3cret"),)),  # the scheme is required
                await _say(channel, metadata=(("authorization", "Bearer s3cret"),)),
                (await health(pb.PredictRequest(session_id="probe"), timeout=10)).text]

    results, seen = _serve_and_call(calls, auth_token="s3cret")
    assert [r[0] for r in results[:4]] == [S.UNAUTHENTICATED] * 3 + [S.OK]
    assert "bearer token" in results[0][1]
    assert results[4] == "said probe"  # health checks carry no token
    assert [code for _, code in seen] == [S.UNAUTHENTICATED] * 3 + [S.OK]  # health is not intercepted


def test_no_token_configured_lets_every_call_through():
    async def calls(channel):
        return [await _say(channel), await _say(channel, metadata=(("authorization", "Bearer anything"),))]

    results, _ = _serve_and_call(calls)
    assert results == [(S.OK, "said ok")] * 2
