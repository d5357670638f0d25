"""The SDK's one error type: a failed call, with its gRPC status code."""

from __future__ import annotations

import grpc


class LongbowError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code, self.message = code, message
