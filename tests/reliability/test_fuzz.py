"""Fuzzing the gateway from its own OpenAPI schema with schemathesis: valid and invalid requests generated
for every operation must never get a 5xx, and every error must be OpenAI's envelope.

The app runs on a real socket (uvicorn in a thread) in front of an in-process fake engine; examples are
bounded (``MAX_EXAMPLES`` per operation and mode, fixed seed, no example database) so the whole run stays
well under a minute. Invalid bodies come from schemathesis's negative mode; hand-written ones that JSON
schemas cannot express (NaN, lone surrogates, bad UTF-8) are in test_bad_input.py.
"""

from __future__ import annotations

from collections.abc import Iterator

import hypothesis
import pytest
import requests
import schemathesis
from schemathesis import GenerationMode

from server.app import create_app
from server.passkey_check import ROUTE as PASSKEY
from server.upstreams import EnginePool
from tests.server.conftest import fake_urls, settings_for
from tests.server.fake_engine import FakeEngine
from tests.server.servers import serve_in_thread

MAX_EXAMPLES = 120


def build_app():  # noqa: ANN201
    # A small context (L = 2048, up to 4x: the examples fit) keeps generated long prompts cheap for the fake engine; short
    # passkey cache so repeated lengths do not hide work.
    urls = fake_urls(1)
    settings = settings_for(urls, rope_original_max_position=2048, rope_max_factor=4.0, passkey_cache_ttl_s=60)
    engine = FakeEngine(scaling=settings.rope_scaling())
    pool = EnginePool.from_settings(settings, transports={urls[0]: engine.transport()})
    return create_app(settings, engine_pool=pool)


APP = build_app()
schema = schemathesis.openapi.from_dict(APP.openapi())
schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE],
                                max_examples=MAX_EXAMPLES, deterministic=True, database="none")


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    with serve_in_thread(APP) as url:
        yield url


SESSION = requests.Session()


def check_envelope(response: schemathesis.Response) -> None:
    request = response.request
    passkey_failed = response.status_code == 503 and PASSKEY in request.url and response.json().get("passed") is False
    assert response.status_code < 500 or passkey_failed, (
        f"{response.status_code} for {request.method} {request.url} {request.body!r:.300}: {response.text[:500]}")
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body, dict) and isinstance(body.get("error"), dict), response.text[:500]
        error = body["error"]
        assert {"message", "type", "param", "code"} <= set(error), error
        assert isinstance(error["message"], str) and error["message"], error


@pytest.mark.timeout(120)
@schema.parametrize()
@hypothesis.settings(deadline=None, suppress_health_check=list(hypothesis.HealthCheck), derandomize=True,
                     database=None, max_examples=MAX_EXAMPLES)
def test_no_5xx_and_every_error_enveloped(case: schemathesis.Case, base_url: str) -> None:
    check_envelope(case.call(base_url=base_url, session=SESSION, timeout=30))
