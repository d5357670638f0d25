"""Longbow's client SDK: grpcio + protobuf only (no torch), sync and asyncio clients."""
