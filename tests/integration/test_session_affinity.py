"""Edit sessions are replica-local: two real gateways (own engines, real sockets, the real model), a
session opened on one and called on the other is FAILED_PRECONDITION naming both replicas, and the
session is untouched on its own replica. Without gateway.replica_id, ids carry the host name."""

from __future__ import annotations

import socket

import grpc
import pytest

from longbow.services.client.sdk import Edit, LongbowClient, LongbowError
from tests.conftest import RunningGateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_replicas(loaded_model, tokenizer):
    started = []
    try:
        for name in ("replica-a", "replica-b"):
            started.append(RunningGateway(loaded_model, tokenizer, replica_id=name))
        yield started
    finally:
        for gateway in started:
            gateway.close()


def test_another_replicas_session_is_refused_by_name(two_replicas):
    a, b = two_replicas
    text = "def double(x):\n    return 2 * x\n"
    with LongbowClient(a.address, timeout_s=60) as on_a, LongbowClient(b.address, timeout_s=60) as on_b:
        session = on_a.open_session(text)
        assert session.startswith("replica-a/")
        calls = [lambda: on_b.apply_edits(session, [Edit(0, 0, "# hi\n")]),
                 lambda: on_b.predict(session, cursor=len(text), max_tokens=2),
                 lambda: on_b.close_session(session)]
        for call in calls:
            with pytest.raises(LongbowError) as refused:
                call()
            assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION, refused.value
            assert "'replica-a'" in refused.value.message and "'replica-b'" in refused.value.message
        # Nothing happened to it on its own replica: the refused edit was not applied there either.
        result = on_a.apply_edits(session, [Edit(0, 0, "# hi\n")])
        assert result.tokens == len(on_a.tokenize("# hi\n" + text))
        on_a.close_session(session)


def test_ids_carry_the_host_name_by_default(gateway):
    with LongbowClient(gateway.address, timeout_s=60) as client:
        session = client.open_session("x = 1\n")
        try:
            assert session.startswith(socket.gethostname() + "/")
        finally:
            client.close_session(session)
