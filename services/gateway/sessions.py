"""PIE edit-session RPCs. Placeholder until sessions land."""

from __future__ import annotations

from longbow.v1 import sessions_pb2_grpc
from services.gateway.runtime import GatewayRuntime


class SessionsServicer(sessions_pb2_grpc.SessionsServicer):
    async def close(self) -> None:
        pass


def create_servicer(runtime: GatewayRuntime) -> SessionsServicer:
    return SessionsServicer()
