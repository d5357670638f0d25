"""SDK calls for typed-hole context and completion. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which provide
`self._channel` and `self._call(method, request)` (retries, auth, errors as LongbowError)."""

from __future__ import annotations

import functools

from longbow.v1 import code_assist_pb2_grpc


class CodeAssistCalls:
    @functools.cached_property
    def _code_assist_stub(self):
        return code_assist_pb2_grpc.CodeAssistStub(self._channel)


class AsyncCodeAssistCalls:
    @functools.cached_property
    def _code_assist_stub(self):
        return code_assist_pb2_grpc.CodeAssistStub(self._channel)
