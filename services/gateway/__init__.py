"""The gRPC gateway: Longbow's one front door. Protobuf stops here (convert.py)."""
