"""Code-assist RPCs (typed-hole context, completion). Placeholder until code context lands."""

from __future__ import annotations

from longbow.v1 import code_assist_pb2_grpc
from services.gateway.runtime import GatewayRuntime


class CodeAssistServicer(code_assist_pb2_grpc.CodeAssistServicer):
    async def close(self) -> None:
        pass


def create_servicer(runtime: GatewayRuntime) -> CodeAssistServicer:
    return CodeAssistServicer()
