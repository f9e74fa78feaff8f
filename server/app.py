"""The gateway's FastAPI application: ``create_app(settings)`` builds it; its lifespan owns the engine pool.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (OpenAI-compatible, streaming or not, every
extra field passed to the engine, the RoPE factor in ``x-rope-factor``), ``GET /v1/models``, ``GET /healthz``
(process alive), ``GET /readyz`` (an engine is ready, else 503), ``GET /healthz/passkey`` (the passkey
self-check) and ``GET /metrics`` (Prometheus). Everything the app needs lives in ``app.state``, set up in the
lifespan; nothing is global, so tests build apps around fake engines::

    app = create_app(GatewaySettings(engine_urls=["http://127.0.0.1:8100"]))
    app = create_app(settings, engine_pool=EnginePool.from_settings(settings, transports=fakes))

Embedded mode (no engine URL) is started by ``ropeserve serve`` (``server/cli.py``), which runs the engine
process around this app; ``create_app`` itself needs engine URLs or a pool.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Query, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from rope_ext import format_factor
from server.errors import envelope, install_error_handlers
from server.generation import CHAT, COMPLETIONS, FACTOR_HEADER, Generation, unless_client_leaves
from server.metrics import CONTENT_TYPE, GatewayMetrics
from server.middleware import (
    ApiKeyMiddleware,
    BodyLimitMiddleware,
    EndOnCancelMiddleware,
    RequestMetricsMiddleware,
)
from server.passkey_check import PROGRESS_ROUTE as PASSKEY_PROGRESS_ROUTE
from server.passkey_check import ROUTE as PASSKEY_ROUTE
from server.passkey_check import PasskeyChecker
from server.schemas import ChatCompletionRequest, CompletionRequest
from server.settings import GatewaySettings
from server.tokens import LocalTokenCounter
from server.upstreams import EnginePool

logger = logging.getLogger(__name__)


def create_app(settings: GatewaySettings, *, engine_pool: EnginePool | None = None) -> FastAPI:
    """The gateway app for ``settings``; ``engine_pool`` (started and closed by the app) replaces the pool
    built from ``settings.engine_urls``."""
    if engine_pool is None and settings.embedded:
        raise ValueError("create_app needs engine_urls or an engine_pool; embedded mode (no engine URL) is "
                         "started by `ropeserve serve`")
    scaling = settings.rope_scaling()
    metrics = GatewayMetrics(scaling.buckets)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        counter = await LocalTokenCounter.load(settings.tokenizer) if settings.tokenizer else None
        pool = engine_pool or EnginePool.from_settings(settings)
        metrics.watch(pool)
        generation = Generation(pool, scaling, settings.served_model_name, metrics, counter)
        app.state.settings = settings
        app.state.pool = pool
        app.state.metrics = metrics
        app.state.generation = generation
        app.state.passkey = PasskeyChecker(generation, metrics, cache_ttl_s=settings.passkey_cache_ttl_s)
        app.state.started = time.time()
        await pool.start()
        logger.info("gateway for %s: %d engine(s), %d ready; RoPE %s, L=%d, up to factor %g (%d tokens)",
                    settings.served_model_name, len(pool.engines), sum(e.healthy for e in pool.engines),
                    scaling.method, scaling.original_max_position, scaling.max_factor, scaling.max_context)
        try:
            yield
        finally:
            await pool.close()
            if counter is not None:
                counter.close()

    app = FastAPI(title="ropeserve gateway", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible gateway to vLLM engines with per-request RoPE scaling.")
    install_error_handlers(app)
    # Added innermost first: metrics see every request, including refused ones and CORS preflights.
    app.add_middleware(EndOnCancelMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyMiddleware, keys=[k.get_secret_value().encode() for k in settings.api_keys])
    if settings.cors_allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_allow_origins,
                           allow_credentials=settings.cors_allow_credentials,
                           allow_methods=["GET", "POST", "OPTIONS"],
                           allow_headers=["Authorization", "Content-Type"], expose_headers=[FACTOR_HEADER])
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)

    @app.post(COMPLETIONS, summary="OpenAI completions, with per-request RoPE scaling")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await unless_client_leaves(request.receive, request.app.state.generation.handle(COMPLETIONS, body))

    @app.post(CHAT, summary="OpenAI chat completions, with per-request RoPE scaling")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await unless_client_leaves(request.receive, request.app.state.generation.handle(CHAT, body))

    @app.get("/v1/models", summary="The served model, with its original and maximum context")
    async def models(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": [{
            "id": settings.served_model_name,
            "object": "model",
            "created": int(request.app.state.started),
            "owned_by": "ropeserve",
            "max_model_len": scaling.max_context,
            "original_max_position": scaling.original_max_position,
            "max_context": scaling.max_context,
            "rope": {"method": scaling.method, "max_factor": scaling.max_factor,
                     "buckets": list(scaling.buckets), "finetuned_factor": scaling.finetuned_factor,
                     "generation_reserve": scaling.generation_reserve},
        }]}

    @app.get("/healthz", summary="The gateway process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="At least one engine is ready (503 otherwise)")
    async def readyz(request: Request) -> JSONResponse:
        pool: EnginePool = request.app.state.pool
        engines = pool.status()
        if pool.ready:
            return JSONResponse({"status": "ready", "engines": engines})
        body = envelope("no engine is ready", "server_error", code="no_engine_available")
        return JSONResponse({**body, "status": "not_ready", "engines": engines}, status_code=503)

    @app.get(PASSKEY_ROUTE, summary="Passkey-retrieval self-check at a given context length")
    async def passkey(request: Request,
                      len: str | None = Query(None, description="The request's context in tokens: a "  # noqa: A002
                                              "prompt of len - 10 tokens (or up to 1 % fewer) and the 10-token "
                                              "answer; at most the served maximum context.", examples=["4096"]),
                      depth: str | None = Query(None, description="Depth of the key in [0, 1].",
                                                examples=["0.5"]),
                      seed: str | None = Query(None, description="Seed of the key and depth (default 0).",
                                               examples=["0"])
                      ) -> JSONResponse:
        checker: PasskeyChecker = request.app.state.passkey
        result = await checker.run(checker.parse(len=len, depth=depth, seed=seed))
        return JSONResponse(result, status_code=200 if result["passed"] else 503,
                            headers={FACTOR_HEADER: format_factor(result["rope_factor"])})

    @app.get(PASSKEY_PROGRESS_ROUTE, summary="Progress of the running passkey self-check")
    async def passkey_progress(request: Request) -> dict[str, Any]:
        return request.app.state.passkey.progress()

    @app.get("/metrics", summary="Prometheus metrics")
    async def prometheus(request: Request) -> Response:
        return Response(request.app.state.metrics.render(), media_type=CONTENT_TYPE)

    return app
