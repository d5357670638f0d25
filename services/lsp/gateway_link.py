"""The one door from the language server to the gateway: an `AsyncLongbowClient`, the connection state,
and what the editor is told about it.

A gateway that is down must never take the editor's language server with it: a call that finds it
unreachable raises `GatewayDown` (handlers answer "nothing" instead of an error popup), the state flips to
disconnected once (one `window/showMessage`; every failure goes to `window/logMessage`), and a probe
reconnects with a fresh channel (a gRPC channel's own reconnect backoff grows to minutes). Each
reconnection starts a new `epoch`: a restarted gateway lost its sessions and pinned files, so whatever
belongs to an older epoch is sent again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from longbow.services.client.errors import LongbowError
from longbow.services.client.sdk import AsyncLongbowClient, RetryPolicy

log = logging.getLogger(__name__)

# NOTE: DEADLINE_EXCEEDED is not "down": a slow completion on a loaded gateway times out while the
# gateway is fine. Only an unreachable server (UNAVAILABLE) flips the state.
UNREACHABLE = (grpc.StatusCode.UNAVAILABLE,)


class GatewayDown(Exception):
    """The gateway could not be reached; the link is reconnecting."""


@dataclass(frozen=True)
class GatewaySettings:
    address: str
    token: str = ""
    root_certificates: bytes | None = None  # None: plaintext
    timeout_s: float = 60.0
    probe_interval_s: float = 1.0


class GatewayLink:
    def __init__(self, settings: GatewaySettings, on_change: Callable[[bool, str], None]):
        self.settings = settings
        self._on_change = on_change  # (connected, message): the server reports it to the editor
        self._client = self._new_client()
        self.connected = True  # optimistic until a call fails: no popup before anyone asked for anything
        self.epoch = 0
        self._probe: asyncio.Task | None = None

    def _new_client(self) -> AsyncLongbowClient:
        # One attempt: the editor is waiting, and the probe (not the call) waits for the gateway to return.
        return AsyncLongbowClient(self.settings.address, token=self.settings.token,
                                  root_certificates=self.settings.root_certificates,
                                  timeout_s=self.settings.timeout_s, retry=RetryPolicy(attempts=1))

    async def call(self, method: str, *args, **kwargs):
        """`await client.<method>(*args, **kwargs)`; GatewayDown when unreachable, LongbowError otherwise.
        Cancelling the awaiting task cancels the gRPC call."""
        if not self.connected:
            raise GatewayDown(f"Longbow gateway at {self.settings.address} is unreachable")
        client = self._client
        try:
            return await getattr(client, method)(*args, **kwargs)
        except LongbowError as error:
            if error.code in UNREACHABLE:
                self._lost(client, error)
                raise GatewayDown(str(error)) from None
            raise

    def _lost(self, client: AsyncLongbowClient, error: LongbowError) -> None:
        if client is not self._client or not self.connected:
            return  # another call already noticed
        self.connected = False
        log.warning("event=gateway_down address=%s error=%r", self.settings.address, error.message)
        self._on_change(False, f"Longbow gateway at {self.settings.address} is unreachable ({error.message}); "
                               "retrying in the background")
        self._probe = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        while True:
            # A timer between attempts, not a stand-in for synchronisation: there is nothing to wait on
            # but the remote server coming back.
            await asyncio.sleep(self.settings.probe_interval_s)
            candidate = self._new_client()
            try:
                await asyncio.wait_for(candidate.server_info(), timeout=max(self.settings.probe_interval_s, 1.0))
            except (LongbowError, asyncio.TimeoutError):
                await candidate.close()
                continue
            old, self._client = self._client, candidate
            await old.close()
            self.epoch += 1
            self.connected = True
            log.warning("event=gateway_up address=%s epoch=%d", self.settings.address, self.epoch)
            self._on_change(True, f"Longbow gateway at {self.settings.address} is back")
            return

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
        await self._client.close()
