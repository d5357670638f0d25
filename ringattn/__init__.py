"""Sequence-parallel attention over torch.distributed.

Owns the attention math only: no Ray, no gRPC, no model. Every schedule here returns
exactly what single-device attention would (see tests/ringattn).
"""
