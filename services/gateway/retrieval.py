"""Retrieval RPCs (ingest, delete, query). Placeholder until the RAG front end lands."""

from __future__ import annotations

from longbow.v1 import retrieval_pb2_grpc
from services.gateway.runtime import GatewayRuntime


class RetrievalServicer(retrieval_pb2_grpc.RetrievalServicer):
    async def close(self) -> None:
        pass


def create_servicer(runtime: GatewayRuntime) -> RetrievalServicer:
    return RetrievalServicer()
