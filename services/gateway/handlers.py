"""gRPC servicers: decode, call one domain function, encode. Errors are the interceptor's job."""

from __future__ import annotations

from longbow.v1 import (
    generation_pb2 as gen_pb,
    generation_pb2_grpc,
    server_info_pb2 as info_pb,
    server_info_pb2_grpc,
)
from longbow.services.gateway import convert
from longbow.services.gateway.generation import GenerationInput, GenerationService


class GenerationServicer(generation_pb2_grpc.GenerationServicer):
    def __init__(self, service: GenerationService):
        self.service = service

    async def Generate(self, request, context):
        inputs = convert.generate_from_pb(request, self.service.config.default_max_tokens)
        result = await self.service.generate(inputs)
        return convert.result_to_pb(result, request.sampling.logprobs)

    async def GenerateStream(self, request, context):
        inputs = convert.generate_from_pb(request, self.service.config.default_max_tokens)
        async for delta, result in self.service.stream(inputs):
            yield convert.chunk_to_pb(delta.text, delta.event, result, request.sampling.logprobs)

    async def Score(self, request, context):
        which = request.WhichOneof("input")
        text = request.text if which == "text" else None
        ids = list(request.token_ids.ids) if which == "token_ids" else None
        if which is None:
            text = ""
        token_ids, logprobs = await self.service.score(text, ids)
        return gen_pb.ScoreResponse(token_ids=token_ids, logprobs=logprobs)

    async def Tokenize(self, request, context):
        ids, pieces = await self.service.tokenize(request.text, request.chat)
        return gen_pb.TokenizeResponse(token_ids=ids, pieces=pieces)


class ServerInfoServicer(server_info_pb2_grpc.ServerInfoServiceServicer):
    def __init__(self, info: info_pb.ServerInfo):
        self.info = info

    async def GetServerInfo(self, request, context):
        return self.info
