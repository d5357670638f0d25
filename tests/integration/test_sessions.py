"""Edit sessions over a real gateway socket with the real model: PIE and the exact baseline through
the SDK, the drift re-encode, and bad input mapped to status codes without losing the session."""

from __future__ import annotations

import grpc
import pytest

from longbow.services.client.sdk import AsyncLongbowClient, Edit, LongbowClient, LongbowError

pytestmark = pytest.mark.slow

SOURCE = (
    "def area(width: float, height: float) -> float:\n"
    "    return width * height\n\n\n"
    "def perimeter(width: float, height: float) -> float:\n"
    "    return 2 * (width + height)\n\n\n"
    "def diagonal(width: float, height: float) -> float:\n"
)


@pytest.fixture(scope="module")
def client(gateway):
    with LongbowClient(gateway.address, timeout_s=120) as c:
        yield c


def _fresh_prediction(client, text, cursor, max_tokens):
    """What a session opened on `text` itself predicts (no edits: the reference)."""
    sid = client.open_session(text)
    try:
        return client.predict(sid, cursor, max_tokens=max_tokens)
    finally:
        client.close_session(sid)


def test_full_mode_session_predicts_like_a_fresh_one(client, gateway):
    sid = client.open_session(SOURCE, mode="full")
    new_text = SOURCE.replace("def area", "def rectangle_area")
    result = client.apply_edits(sid, [Edit(4, 8, "rectangle_area")])
    assert result.tokens_encoded == result.tokens  # the exact baseline re-encodes everything
    for cursor in (len(new_text), new_text.index("    return 2")):
        assert client.predict(sid, cursor, max_tokens=8) == _fresh_prediction(client, new_text, cursor, 8)
    client.close_session(sid)
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0


def test_pie_session_edits_reposition_and_reencode(client, gateway):
    sid = client.open_session(SOURCE)
    small = client.apply_edits(sid, [Edit(4, 8, "rectangle_area")])
    assert 0 < small.tokens_encoded <= 4 and not small.reencode_scheduled
    big_insert = "# " + "a long comment that spends the drift budget " * 80 + "\n"
    big = client.apply_edits(sid, [Edit(0, 0, big_insert)])
    assert big.reencode_scheduled
    text = big_insert + SOURCE.replace("def area", "def rectangle_area")
    # The re-encode ran on the engine thread before this call (commands are FIFO): the KV is exact
    # again, so the prediction equals a fresh encoding's.
    assert client.predict(sid, len(text), max_tokens=6) == _fresh_prediction(client, text, len(text), 6)
    line = client.predict(sid, text.index("    return width") + len("    return"))
    assert "\n" not in line
    client.close_session(sid)
    metrics = _metrics(gateway)
    assert metrics["longbow_session_reencodes_total"] >= 1 and metrics["longbow_session_update_seconds_count"] >= 2


def _metrics(gateway) -> dict[str, float]:
    import urllib.request

    body = urllib.request.urlopen(f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics", timeout=10).read()
    return {line.split()[0]: float(line.split()[1]) for line in body.decode().splitlines()
            if line and not line.startswith("#") and "{" not in line}


def test_bad_input_gets_clear_codes_and_keeps_the_session(client, gateway):
    sid = client.open_session(SOURCE)
    cases = [
        (lambda: client.apply_edits(sid, [Edit(5, 3, "x")]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.apply_edits(sid, [Edit(0, 10**6, "x")]), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.predict(sid, len(SOURCE) + 5), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.predict(sid, 0, max_tokens=10_000), grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: client.predict("no-such-session", 0), grpc.StatusCode.NOT_FOUND),
        (lambda: client.close_session("no-such-session"), grpc.StatusCode.NOT_FOUND),
        (lambda: client.open_session("x = 1\n" * 5000), grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, code in cases:
        with pytest.raises(LongbowError) as err:
            call()
        assert err.value.code == code, err.value
    assert isinstance(client.predict(sid, len(SOURCE), max_tokens=2), str)  # still there, still serving
    client.close_session(sid)
    assert gateway.wait_until_idle()["kv_blocks_used"] == 0


def test_async_client_and_server_info(gateway):
    import asyncio

    async def run():
        async with AsyncLongbowClient(gateway.address) as c:
            sid = await c.open_session("print('hi')\n")
            result = await c.apply_edits(sid, [Edit(7, 9, "hello")])
            text = await c.predict(sid, 3, max_tokens=2)
            await c.close_session(sid)
            info = await c.server_info()
            return result, text, info

    result, text, info = asyncio.run(run())
    assert result.tokens > 0 and isinstance(text, str)
    assert "longbow.v1.Sessions" in info.implemented_services
