import collections
from hypothesis import given, settings
from hypothesis import strategies as st
from tests.gateway.test_fuzz import generate_requests, _status, channel  # noqa
import grpc

def test_probe(channel):
    counts = collections.Counter()
    details = collections.Counter()
    @settings(max_examples=45, deadline=None, database=None)
    @given(request=generate_requests(), method=st.sampled_from(["Generate", "GenerateStream"]))
    def check(request, method):
        code, d = _status(channel, method, request.SerializeToString())
        counts[code.name] += 1
        details[d[:50]] += 1
    check()
    print(counts); print(details.most_common(15))
