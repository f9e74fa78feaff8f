"""The engine pool: least-in-flight routing, health-check ejection and recovery, refused connections, and
the model/context check that keeps a misconfigured engine out."""

from __future__ import annotations

import anyio
import httpx
import pytest

from server.errors import GatewayError, NoEngineAvailable
from server.upstreams import Engine, EnginePool
from tests.server.conftest import fake_urls
from tests.server.fake_engine import MODEL, FakeEngine

pytestmark = pytest.mark.anyio


def make_pool(engines: list[FakeEngine], *, eject_after: int = 2, max_model_len: int = 65536) -> EnginePool:
    urls = fake_urls(len(engines))
    transports = {url: engine.transport() for url, engine in zip(urls, engines, strict=True)}
    return EnginePool(urls, model=MODEL, max_model_len=max_model_len, eject_after_failures=eject_after,
                      health_interval_s=3600, transports=transports)


def get_models(engine: Engine) -> httpx.Request:
    return engine.client.build_request("GET", "/v1/models")


async def test_least_in_flight_then_round_robin() -> None:
    pool = make_pool([FakeEngine(), FakeEngine(), FakeEngine()])
    await pool.check_all()
    a, b, c = pool.engines
    first = [pool.lease() for _ in range(3)]
    assert [lease.engine for lease in first] == [a, b, c]  # ties: the least recently picked
    assert [e.in_flight for e in pool.engines] == [1, 1, 1]
    first[1].release()
    first[1].release()  # idempotent
    assert pool.lease().engine is b  # b has the fewest in flight
    assert b.in_flight == 1
    for lease in first:
        lease.release()
    assert [e.in_flight for e in pool.engines] == [0, 1, 0]
    await pool.close()


async def test_health_checks_eject_after_failures_and_recover() -> None:
    engines = [FakeEngine(), FakeEngine()]
    pool = make_pool(engines, eject_after=2)
    await pool.check_all()
    assert pool.ready and all(e.healthy for e in pool.engines)
    engines[0].healthy = False
    await pool.check_all()
    assert pool.engines[0].healthy  # one failure is tolerated
    await pool.check_all()
    assert not pool.engines[0].healthy and pool.engines[0].state == "unhealthy"
    assert "503" in pool.engines[0].last_error
    assert {pool.lease().engine for _ in range(4)} == {pool.engines[1]}
    engines[0].healthy = True
    await pool.check_all()
    assert pool.engines[0].healthy and pool.engines[0].failures == 0
    await pool.close()


async def test_no_engine_ready_is_503_that_says_why() -> None:
    engine = FakeEngine()
    engine.down = True
    pool = make_pool([engine])
    await pool.check_all()
    assert not pool.ready
    with pytest.raises(NoEngineAvailable, match="no engine is ready.*ConnectError") as info:
        pool.lease()
    assert info.value.status_code == 503
    await pool.close()


async def test_refused_connection_ejects_at_once_and_tries_the_next_engine() -> None:
    engines = [FakeEngine(), FakeEngine()]
    pool = make_pool(engines, eject_after=5)
    await pool.check_all()
    engines[0].down = True
    lease, response = await pool.send(get_models)
    lease.release()
    assert response.status_code == 200 and lease.engine is pool.engines[1]
    assert not pool.engines[0].healthy  # ejected without waiting for 5 failed checks
    engines[1].down = True
    with pytest.raises(NoEngineAvailable, match="no engine reachable: connection refused by .*engine-1"):
        await pool.send(get_models)
    assert [e.in_flight for e in pool.engines] == [0, 0]
    engines[0].down = engines[1].down = False
    await pool.check_all()
    assert all(e.healthy for e in pool.engines)
    await pool.close()


async def test_engine_serving_another_model_or_context_stays_out() -> None:
    wrong_model = FakeEngine(model="other-model")
    wrong_context = FakeEngine(max_model_len=8192)
    good = FakeEngine()
    pool = make_pool([wrong_model, wrong_context, good])
    await pool.check_all()
    states = [e.state for e in pool.engines]
    assert states == ["misconfigured", "misconfigured", "healthy"]
    assert "does not serve model 'fake-model'" in pool.engines[0].last_error
    assert "max_model_len is 8192" in pool.engines[1].last_error
    await pool.close()


_FRESH_ROPE_METRICS = ('ropeserve_engine_rope_scheduled_tokens_total{factor="1"} 0\n'
                       'ropeserve_engine_rope_tokens_total{factor="1"} 0\n')


async def test_timeout_is_504_and_transport_failure_502() -> None:
    class Failing(httpx.AsyncBaseTransport):
        def __init__(self, exc: type[Exception]) -> None:
            self.exc = exc

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/health" or request.url.path == "/v1/models":
                return httpx.Response(200, json={"data": [{"id": MODEL, "max_model_len": 65536}]})
            if request.url.path == "/metrics":
                return httpx.Response(200, text=_FRESH_ROPE_METRICS)
            raise self.exc("boom", request=request)

    for exc, status in ((httpx.ReadTimeout, 504), (httpx.RemoteProtocolError, 502)):
        pool = EnginePool(["http://e.test"], model=MODEL, max_model_len=65536,
                          transports={"http://e.test": Failing(exc)})
        await pool.check_all()
        with pytest.raises(GatewayError) as info:
            await pool.send(lambda engine: engine.client.build_request("POST", "/v1/completions"))
        assert info.value.status_code == status
        assert pool.engines[0].in_flight == 0
        await pool.close()


async def test_background_loop_checks_periodically() -> None:
    engine = FakeEngine()
    urls = fake_urls(1)
    pool = EnginePool(urls, model=MODEL, max_model_len=65536, health_interval_s=0.01,
                      transports={urls[0]: engine.transport()})
    await pool.start()
    with anyio.fail_after(5):
        while engine.health_checks < 4:
            await anyio.sleep(0.01)
    await pool.close()
    checks = engine.health_checks
    await anyio.sleep(0.05)
    assert engine.health_checks == checks  # the loop stopped with the pool


async def test_small_calls_do_not_turn_the_round_robin() -> None:
    pool = make_pool([FakeEngine(), FakeEngine()])
    await pool.check_all()
    a, b = pool.engines
    picks = []
    for _ in range(4):  # a tokenize call, then a generation, per request
        pool.lease(rotate=False).release()
        lease = pool.lease()
        picks.append(lease.engine)
        lease.release()
    assert picks == [a, b, a, b]
    await pool.close()


async def test_an_engine_without_the_rope_plugin_is_misconfigured() -> None:
    engine = FakeEngine()
    engine.rope_plugin_missing = True
    urls = fake_urls(1)
    pool = EnginePool(urls, model=MODEL, max_model_len=65536, transports={urls[0]: engine.transport()})
    await pool.check_all()
    assert pool.engines[0].state == "misconfigured" and not pool.ready
    assert "rope plugin is not installed" in pool.engines[0].last_error
    await pool.close()


async def test_an_engine_that_schedules_scaled_tokens_but_computes_none_leaves_rotation() -> None:
    """The plugin's hook broken on purpose: scaled requests run, but nothing is computed at their factor."""
    engine = FakeEngine()
    urls = fake_urls(1)
    pool = EnginePool(urls, model=MODEL, max_model_len=65536, eject_after_failures=2, evidence_interval_s=0,
                      transports={urls[0]: engine.transport()})
    await pool.check_all()
    assert pool.ready
    engine.rope_hook_broken = True
    async with httpx.AsyncClient(transport=engine.transport(), base_url=urls[0]) as client:
        long = {"model": MODEL, "prompt": " ".join(["w"] * 9000), "max_tokens": 4}
        assert (await client.post("/v1/completions", json=long)).status_code == 200
    await pool.check_all()
    assert pool.ready  # one check could catch a step in flight
    await pool.check_all()
    assert not pool.ready and pool.engines[0].state == "unhealthy"
    assert "scheduled 9004 tokens at scaled RoPE factors but computed none" in pool.engines[0].last_error
    engine.rope_hook_broken = False  # a healthy engine (say, restarted) computes at its factors again
    engine.rope_computed.update(engine.rope_scheduled)
    await pool.check_all()
    assert pool.ready
    await pool.close()


async def test_the_rope_evidence_is_read_when_an_engine_joins_then_every_evidence_interval() -> None:
    """/health every check; /metrics (vLLM renders all of its metrics) at the join, then once the last reading
    is evidence_interval_s old, and at every check while a reading fails."""
    engine = FakeEngine()
    urls = fake_urls(1)
    pool = EnginePool(urls, model=MODEL, max_model_len=65536, evidence_interval_s=3600,
                      transports={urls[0]: engine.transport()})
    await pool.check_all()
    await pool.check_all()
    assert pool.ready and engine.metrics_reads == 1
    pool.engines[0].last_evidence -= 3600
    await pool.check_all()
    assert engine.metrics_reads == 2
    engine.rope_plugin_missing = True  # a reading that fails: read again at the next check, not an hour later
    pool.engines[0].last_evidence -= 3600
    await pool.check_all()
    engine.rope_plugin_missing = False
    await pool.check_all()
    assert engine.metrics_reads == 4
    await pool.close()


def test_rope_evidence_reads_the_engines_counters() -> None:
    from server.upstreams import rope_evidence

    text = ("# TYPE ropeserve_engine_rope_tokens counter\n"
            'ropeserve_engine_rope_tokens_total{factor="1"} 50.0\n'
            'ropeserve_engine_rope_tokens_total{factor="2"} 7.0\n'
            'ropeserve_engine_rope_tokens_created{factor="2"} 1.7e9\n'
            "# TYPE ropeserve_engine_rope_scheduled_tokens counter\n"
            'ropeserve_engine_rope_scheduled_tokens_total{factor="1"} 51.0\n'
            'ropeserve_engine_rope_scheduled_tokens_total{factor="4"} 3.0\n'
            'vllm:num_requests_running 0\n')
    assert rope_evidence(text) == (3, 7)
    assert rope_evidence("vllm:num_requests_running 0\n") is None
