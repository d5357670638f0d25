"""SDK calls for ingest, delete, query. Mixed into `LongbowClient` / `AsyncLongbowClient` (sdk.py), which provide
`self._channel` and `self._call(method, request)` (retries, auth, errors as LongbowError)."""

from __future__ import annotations

import functools

from longbow.v1 import retrieval_pb2_grpc


class RetrievalCalls:
    @functools.cached_property
    def _retrieval_stub(self):
        return retrieval_pb2_grpc.RetrievalStub(self._channel)


class AsyncRetrievalCalls:
    @functools.cached_property
    def _retrieval_stub(self):
        return retrieval_pb2_grpc.RetrievalStub(self._channel)
