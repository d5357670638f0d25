"""Assembles and runs the grpc.aio server: servicers, the error/auth interceptor, health checking,
reflection, TLS when certificates are given, and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import dataclasses
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import longbow
from longbow.v1 import (
    code_assist_pb2,
    code_assist_pb2_grpc,
    generation_pb2,
    generation_pb2_grpc,
    retrieval_pb2,
    retrieval_pb2_grpc,
    server_info_pb2,
    server_info_pb2_grpc,
    sessions_pb2,
    sessions_pb2_grpc,
)
from longbow.services.config import LongbowConfig
from longbow.services.engine.engine import AsyncLLMEngine
from longbow.services.gateway import code_assist, handlers, retrieval, sessions
from longbow.services.gateway.errors import ErrorInterceptor
from longbow.services.gateway.generation import GenerationService
from longbow.services.gateway.lifecycle import DrainInterceptor, Lifecycle
from longbow.services.gateway.limits import receive_limit_bytes
from longbow.services.gateway.metrics import GatewayMetrics
from longbow.services.gateway.runtime import GatewayRuntime

log = logging.getLogger(__name__)

_DESCRIPTORS = [generation_pb2, retrieval_pb2, code_assist_pb2, sessions_pb2, server_info_pb2]
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


@dataclass
class Gateway:
    server: grpc.aio.Server
    port: int
    metrics_port: int | None
    engine: AsyncLLMEngine
    generation: GenerationService
    health: health.aio.HealthServicer
    servicers: list = dataclasses.field(default_factory=list)
    _metrics_task: asyncio.Task | None = None
    lifecycle: Lifecycle | None = None

    async def drain(self) -> None:
        """SIGTERM: finish or end the calls in flight (lifecycle.py), then stop the rest."""
        await self.lifecycle.drain(self.server)
        await self.stop(0)

    async def stop(self, grace: float = 5.0) -> None:
        if self._metrics_task:
            self._metrics_task.cancel()
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)
        if self.lifecycle:
            await self.lifecycle.close()
        for servicer in self.servicers:
            await servicer.close()


def _service_names() -> list[str]:
    return [s.full_name for module in _DESCRIPTORS for s in module.DESCRIPTOR.services_by_name.values()]


def implemented_services(servicers: list) -> list[str]:
    """Full names of the services whose servicer defines every RPC itself (not the generated stubs)."""
    names = []
    for servicer in servicers:
        base = type(servicer).__mro__[1]
        for module in _DESCRIPTORS:
            for service in module.DESCRIPTOR.services_by_name.values():
                if base.__name__ == f"{service.name}Servicer" and all(
                        m.name in vars(type(servicer)) for m in service.methods):
                    names.append(service.full_name)
    return names


def _server_info(config: LongbowConfig, engine: AsyncLLMEngine, implemented: list[str]) -> server_info_pb2.ServerInfo:
    e = engine.engine
    return server_info_pb2.ServerInfo(
        version=longbow.__version__, model=config.model.name_or_path, max_context_tokens=e.max_model_len,
        scheduler=config.engine.policy, token_budget=e.scheduler.token_budget,
        kv_capacity_tokens=config.engine.num_blocks * config.engine.block_size, implemented_services=implemented,
    )


async def start_gateway(config: LongbowConfig, engine: AsyncLLMEngine, tokenizer) -> Gateway:
    """Start serving on config.gateway.host:port (port 0 picks a free one)."""
    gw = config.gateway
    metrics = GatewayMetrics()
    interceptor = ErrorInterceptor(gw.auth_token, metrics.record_status)
    options = [("grpc.max_receive_message_length", receive_limit_bytes(config)),
               ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)]
    lifecycle = Lifecycle(health.aio.HealthServicer(), engine, gw, _service_names())
    server = grpc.aio.server(interceptors=[DrainInterceptor(lifecycle), interceptor], options=options)
    generation = GenerationService(engine, tokenizer, gw, metrics)
    runtime = GatewayRuntime(config, engine, tokenizer, metrics, asyncio.get_running_loop())
    servicers = [retrieval.create_servicer(runtime), code_assist.create_servicer(runtime),
                 sessions.create_servicer(runtime)]
    generation_servicer = handlers.GenerationServicer(generation)
    info = _server_info(config, engine, implemented_services([generation_servicer, *servicers]) + [
        "longbow.v1.ServerInfoService"])
    generation_pb2_grpc.add_GenerationServicer_to_server(generation_servicer, server)
    server_info_pb2_grpc.add_ServerInfoServiceServicer_to_server(handlers.ServerInfoServicer(info), server)
    retrieval_pb2_grpc.add_RetrievalServicer_to_server(servicers[0], server)
    code_assist_pb2_grpc.add_CodeAssistServicer_to_server(servicers[1], server)
    sessions_pb2_grpc.add_SessionsServicer_to_server(servicers[2], server)
    health_servicer = lifecycle.health
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = _service_names()
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = _bind(server, gw)
    await server.start()
    await lifecycle.start(gw.host)  # NOT_SERVING until the engine has stepped; a watchdog after that
    await lifecycle.wait_warmed_up()
    await servicers[0].report_health(health_servicer)  # Retrieval NOT_SERVING while its store is down
    metrics_port = metrics.serve(gw.metrics_port, gw.host) if gw.metrics_port is not None else None
    gateway = Gateway(server, port, metrics_port, engine, generation, health_servicer, servicers, lifecycle=lifecycle)
    gateway._metrics_task = asyncio.create_task(_refresh_metrics(generation))
    log.info("gateway listening on %s:%d (metrics %s, auth %s, tls %s)", gw.host, port, metrics_port,
             bool(gw.auth_token), bool(gw.tls_cert))
    return gateway


def _bind(server: grpc.aio.Server, gw) -> int:
    address = f"{gw.host}:{gw.port}"
    if gw.tls_cert and gw.tls_key:
        with open(gw.tls_key, "rb") as key, open(gw.tls_cert, "rb") as cert:
            credentials = grpc.ssl_server_credentials([(key.read(), cert.read())])
        return server.add_secure_port(address, credentials)
    return server.add_insecure_port(address)


async def _refresh_metrics(generation: GenerationService, period_s: float = 1.0) -> None:
    # Gauges (queue depth, KV usage) are sampled; a scrape sees values at most period_s old.
    while True:
        with contextlib.suppress(Exception):
            await generation.refresh_metrics()
        await asyncio.sleep(period_s)


async def serve(config: LongbowConfig) -> None:
    """`longbow serve`: load the model, start the engine and the gateway, stop cleanly on SIGTERM."""
    from longbow.services.engine.weights import load_tokenizer
    from longbow.services.replica import build_engine

    engine = AsyncLLMEngine(build_engine(config))
    tokenizer = load_tokenizer(engine.engine.loaded.checkpoint)
    gateway = await start_gateway(config, engine, tokenizer)
    print(f"longbow: serving {config.model.name_or_path} on {config.gateway.host}:{gateway.port}"
          + (f", metrics on :{gateway.metrics_port}/metrics" if gateway.metrics_port else ""), flush=True)
    print(f"longbow: {code_assist.readable_roots_line(config.code)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await gateway.drain()
    engine.shutdown()
