"""Longbow's public Python API: the client SDK (grpcio + protobuf only, no torch).

    from longbow import LongbowClient
    with LongbowClient("localhost:50051") as client:
        print(client.generate("Hello").text)

Everything Longbow installs lives under this one name: `longbow.v1` (protobuf and gRPC modules generated
from protos/, with the .proto files), `longbow.langchain` (LangChain adapters), and the server side in
`longbow.services`, `longbow.rag` and `longbow.ringattn` (the `server` extra).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Public name -> the SDK module that defines it. Imported lazily so `import longbow.v1` (used by the
# generated code and the server) does not pull the client in, and `import longbow` stays cheap.
_PUBLIC = {
    "LongbowClient": "sdk", "AsyncLongbowClient": "sdk", "Generation": "sdk", "GenerationChunk": "sdk",
    "RetryPolicy": "sdk", "LongbowError": "errors",
    "Citation": "retrieval", "IngestProgress": "retrieval", "QueryResult": "retrieval", "QueryChunk": "retrieval",
    "CodeContext": "code_assist", "ContextItem": "code_assist", "ExpectedType": "code_assist",
    "Diagnostic": "code_assist", "HoleCompletion": "code_assist",
    "Edit": "sessions", "EditResult": "sessions",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'longbow' has no attribute {name!r}")
    module = importlib.import_module(f"longbow.services.client.{_PUBLIC[name]}")
    return getattr(module, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
