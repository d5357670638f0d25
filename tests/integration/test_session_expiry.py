"""Session expiry and per-client limits through a real gateway over gRPC, the real model: the gateway's own
expiry loop (not the manager's expire() called by hand with a fake clock) closes an idle session, frees its
KV and updates the gauge; the next call is NOT_FOUND saying why; a failing expiry round is logged and the
loop keeps going; the session limit is counted per `x-client-id`, else per peer address.

The loop's period (services/gateway/sessions.py EXPIRY_PERIOD_S, 5 s in production) is shortened for
the module's own gateway; waits poll the observable state (the gateway's sessions, the gauge) with a
bound, and never touch the session being watched (any call on it would count as use)."""

from __future__ import annotations

import logging
import time
import urllib.request

import grpc
import pytest

from longbow.v1 import sessions_pb2 as pb
from longbow.v1 import sessions_pb2_grpc
from longbow.services.client.sdk import LongbowClient, LongbowError
from longbow.services.config import SessionsConfig
from longbow.services.gateway import sessions as gateway_sessions
from longbow.services.text.sessions import SessionManager
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow

TICK_S = 0.05
BOUND_S = 20.0  # expiry is due ~1 s after the last use; the bound leaves room for a loaded machine
TEXT = "def area(width, height):\n    return width * height\n"


@pytest.fixture(scope="module")
def running(loaded_model, tokenizer):
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gateway_sessions, "EXPIRY_PERIOD_S", TICK_S)
        sessions = SessionsConfig(max_sessions_per_client=2)
        started = RunningGateway(loaded_model, tokenizer, sections={"sessions": sessions})
        try:
            yield started
        finally:
            started.close()


@pytest.fixture
def client(running):
    with LongbowClient(running.address, timeout_s=60, retry=None) as c:
        yield c
    running.close_sessions(running.session_ids())  # whatever a failed test left open
    assert running.wait_until_idle()["kv_blocks_used"] == 0


def _open_gauge(running) -> float:
    url = f"http://127.0.0.1:{running.gateway.metrics_port}/metrics"
    body = urllib.request.urlopen(url, timeout=10).read()
    return next(float(line.split()[1]) for line in body.decode().splitlines()
                if line.startswith("longbow_sessions_open "))


def _wait_until(condition, what: str) -> None:
    deadline = time.monotonic() + BOUND_S
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {BOUND_S} s"
        time.sleep(TICK_S)  # polling interval of a bounded wait


def _expired_by_the_loop(running, client) -> None:
    idle = client.open_session(TEXT, idle_timeout_s=1)
    kept = client.open_session(TEXT)  # the server's default timeout (600 s): must outlive the idle one
    blocks_each = running.engine_stats()["kv_blocks_used"] // 2
    assert blocks_each > 0
    # Nothing calls the gateway on these sessions from here on: only the expiry loop can close `idle`.
    _wait_until(lambda: idle not in running.session_ids(), "the idle session to expire")
    assert running.session_ids() == {kept}
    assert running.engine_stats()["kv_blocks_used"] == blocks_each  # the expired session's KV is free
    _wait_until(lambda: _open_gauge(running) == 1, "the sessions_open gauge to follow")
    with pytest.raises(LongbowError) as err:
        client.predict(idle, 0, max_tokens=1)
    assert err.value.code == grpc.StatusCode.NOT_FOUND
    assert "expired after 1 s idle" in err.value.message and "open it again" in err.value.message
    assert isinstance(client.predict(kept, len(TEXT), max_tokens=2), str)
    client.close_session(kept)


def test_idle_session_expires_through_the_gateway_loop(running, client):
    _expired_by_the_loop(running, client)


def test_a_failing_expiry_round_is_logged_and_the_loop_keeps_going(running, client, caplog, monkeypatch):
    real_expire, failures = SessionManager.expire, []

    def expire_failing_twice(manager):
        if len(failures) < 2:
            failures.append(time.monotonic())
            raise RuntimeError("injected expiry failure")
        return real_expire(manager)

    caplog.set_level(logging.ERROR, logger=gateway_sessions.__name__)
    monkeypatch.setattr(SessionManager, "expire", expire_failing_twice)
    _wait_until(lambda: len(failures) == 2, "two expiry rounds to fail")
    _expired_by_the_loop(running, client)  # later rounds still run and expire the idle session
    logged = [r for r in caplog.records if r.name == gateway_sessions.__name__ and r.levelno == logging.ERROR]
    assert len(logged) >= 2 and "session expiry round failed" in logged[0].getMessage()
    assert logged[0].exc_info and "injected expiry failure" in str(logged[0].exc_info[1])


def _opener(address: str, client_id: str | None):
    """OpenSession over a raw stub on its own channel, with or without the x-client-id header."""
    channel = grpc.insecure_channel(address)
    stub = sessions_pb2_grpc.SessionsStub(channel)
    metadata = (("x-client-id", client_id),) if client_id is not None else ()

    def open_session() -> tuple[grpc.StatusCode, str]:
        try:
            return grpc.StatusCode.OK, stub.OpenSession(pb.OpenSessionRequest(text=TEXT), metadata=metadata,
                                                        timeout=60).session_id
        except grpc.RpcError as err:
            return err.code(), err.details()

    return channel, open_session


def test_session_limit_is_per_client_id_header_else_per_peer(running, client):
    channels, opened = [], []
    try:
        for who in ("alice", "bob", None, None):
            channel, open_session = _opener(running.address, who)
            channels.append(channel)
            opened.append(open_session)
        alice, bob, anonymous, other_anonymous = opened
        (first_code, alices_first), (second_code, _) = alice(), alice()
        assert first_code == second_code == grpc.StatusCode.OK
        code, message = alice()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this client has 2 open sessions (limit 2)" in message
        # Same address, same process: only the header tells bob apart, and his limit is his own.
        assert [bob()[0], bob()[0]] == [grpc.StatusCode.OK] * 2
        assert bob()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        # Without the header a client is its peer address: two channels from 127.0.0.1 share one limit.
        assert [anonymous()[0], other_anonymous()[0]] == [grpc.StatusCode.OK] * 2
        assert anonymous()[0] == other_anonymous()[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert len(running.session_ids()) == 6
        client.close_session(alices_first)  # the count is of open sessions: a close makes room again
        assert alice()[0] == grpc.StatusCode.OK
    finally:
        for channel in channels:
            channel.close()
