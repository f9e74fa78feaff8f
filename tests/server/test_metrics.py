"""GET /metrics: Prometheus text from the app's own registry, with the series the issue asks for."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from server.metrics import GatewayMetrics
from tests.server.conftest import gateway
from tests.server.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(all_samples, name: str, **labels: str) -> float:  # noqa: ANN001
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_metrics_after_traffic() -> None:
    engines = [FakeEngine(), FakeEngine()]
    async with gateway(engines) as client:
        await client.post("/v1/completions", json={"prompt": "one two three", "max_tokens": 4})
        await client.post("/v1/completions", json={"prompt": " ".join(["w"] * 10000), "max_tokens": 2})
        await client.post("/v1/completions", json={"prompt": " ".join(["w"] * 70000)})  # refused: 400
        await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                        "max_tokens": 3, "stream": True,
                                                        "stream_options": {"include_usage": True}})
        await client.get("/healthz/passkey", params={"len": 200})
        await client.get("/nope")
        engines[1].down = True
        for _ in range(2):  # eject_after_failures
            await client.app.state.pool.check_all()
        response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    s = samples(response.text)
    assert value(s, "ropeserve_requests_total", route="/v1/completions", method="POST", status="200") == 2
    assert value(s, "ropeserve_requests_total", route="/v1/completions", method="POST", status="400") == 1
    assert value(s, "ropeserve_requests_total", route="/v1/chat/completions", method="POST", status="200") == 1
    assert value(s, "ropeserve_requests_total", route="unmatched", method="GET", status="404") == 1
    assert value(s, "ropeserve_request_duration_seconds_count", route="/v1/completions") == 3
    assert value(s, "ropeserve_prompt_tokens_total", route="/v1/completions") == 3 + 10000
    assert value(s, "ropeserve_generated_tokens_total", route="/v1/completions") == 4 + 2
    assert value(s, "ropeserve_generated_tokens_total", route="/v1/chat/completions") == 3  # from the stream's usage
    assert value(s, "ropeserve_admission_rejections_total") == 1
    # factors 1 (short), 2 (10k tokens), 1 (chat), 1 (passkey): cumulative histogram buckets
    assert value(s, "ropeserve_rope_factor_bucket", le="1.0") == 3
    assert value(s, "ropeserve_rope_factor_bucket", le="2.0") == 4
    assert value(s, "ropeserve_rope_factor_count") == 4
    assert value(s, "ropeserve_passkey_runs_total", result="passed") == 1
    assert value(s, "ropeserve_passkey_last_passed") == 1
    assert value(s, "ropeserve_passkey_last_prompt_tokens") == 190  # len is the context: 190 + 10 new
    assert value(s, "ropeserve_passkey_last_rope_factor") == 1
    assert value(s, "ropeserve_engine_healthy", engine="http://engine-0.test:8000") == 1
    assert value(s, "ropeserve_engine_healthy", engine="http://engine-1.test:8000") == 0
    assert value(s, "ropeserve_engine_in_flight", engine="http://engine-0.test:8000") == 0
    assert value(s, "ropeserve_ready") == 1


async def test_failed_passkey_sets_the_last_result() -> None:
    engine = FakeEngine()
    engine.passkey_wrong = True
    async with gateway([engine]) as client:
        await client.get("/healthz/passkey", params={"len": 200})
        s = samples((await client.get("/metrics")).text)
    assert value(s, "ropeserve_passkey_runs_total", result="failed") == 1
    assert value(s, "ropeserve_passkey_last_passed") == 0


def test_each_app_has_its_own_registry() -> None:
    first, second = GatewayMetrics([1, 2]), GatewayMetrics([1, 2])
    first.rope_factor.observe(2)
    assert first.registry is not second.registry and first.registry is not REGISTRY
    assert "ropeserve_rope_factor_count 1.0" in first.render().decode()
    assert "ropeserve_rope_factor_count 0.0" in second.render().decode()
    assert REGISTRY.get_sample_value("ropeserve_rope_factor_count") is None
