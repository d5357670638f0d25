"""Longbow's public Python API: the client SDK (grpcio + protobuf only, no torch).

    from longbow import LongbowClient
    with LongbowClient("localhost:50051") as client:
        print(client.generate("Hello").text)

`longbow.v1` holds the generated protobuf and gRPC modules (built from protos/, not committed).
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so `import longbow.v1` works before the client module is imported.
    from services.client import sdk

    if hasattr(sdk, name):
        return getattr(sdk, name)
    raise AttributeError(name)
