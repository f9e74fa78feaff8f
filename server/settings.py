"""The gateway's settings: one pydantic-settings class fed by a config file, environment and CLI flags.

Precedence, highest first: CLI flags (``ropeserve serve --port 9000``, derived from the fields by
:func:`add_cli_flags`), environment variables (``ROPESERVE_PORT=9000``), a YAML or JSON config file
(``ROPESERVE_CONFIG=/etc/ropeserve.yaml`` or ``--config``; keys are the field names), then the defaults.
List fields take comma-separated strings from the environment and flags (``ROPESERVE_ENGINE_URLS=http://a:8000,http://b:8000``)
and real lists in a config file::

    settings = GatewaySettings()                       # environment and config file
    settings = GatewaySettings(port=9000)              # keyword arguments win over both
    scaling = settings.rope_scaling()                  # the rope_ext.RopeScaling these settings describe

``python scripts/settings_reference.py`` prints the table of every field (docs/gateway.md includes it).
"""

from __future__ import annotations

import argparse
import json
import shlex
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from rope_ext import METHODS, RopeConfigError, RopeScaling
from server.default_model import MODEL_NAME

ENV_PREFIX = "ROPESERVE_"


def _split_commas(value: Any) -> Any:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``; anything else (a list from a config file) unchanged."""
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


CommaList = Annotated[list[str], NoDecode]


class GatewaySettings(BaseSettings):
    """Everything the gateway reads at start-up. Frozen: the app never changes its settings."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid",
                                      validate_default=True)

    # --- the gateway itself --------------------------------------------------------------------------
    config: Path | None = Field(
        None, description="YAML (.yaml/.yml) or JSON (.json) file of settings, keyed by the field names "
        "of this table. Environment variables and CLI flags override its values.")
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=0, le=65535, description="Port the gateway listens on.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = Field(
        "info", description="Log level of the gateway (and of uvicorn).")
    shutdown_grace_s: float = Field(
        30.0, gt=0, description="On SIGTERM or Ctrl-C, how long in-flight requests may run on (new connections "
        "are refused at once); those still running then end with a 503, or streams with an error event.")
    served_model_name: str = Field(
        MODEL_NAME, min_length=1, description="The model name clients send and /v1/models lists; the "
        "engines must serve it under this name (`--served-model-name`).")

    tokenizer: str | None = Field(
        None, description="Tokenizer the gateway counts prompts with (a model directory, or a hub name where "
        "the hub is reachable), so that choosing a request's factor needs no round trip to an engine; it must "
        "be the engines' tokenizer and chat template. Default: the embedded engine's model directory in "
        "embedded mode; with engine_urls, none (prompts are counted by an engine's /tokenize).")

    # --- engines ---------------------------------------------------------------------------------------
    engine_urls: CommaList = Field(
        default_factory=list, description="Base URLs of running vLLM engines with the rope plugin "
        "(comma-separated). Empty: embedded mode, the gateway starts one local engine itself.")
    health_interval_s: float = Field(2.0, gt=0, description="Seconds between health checks of each engine.")
    evidence_interval_s: float = Field(
        30.0, gt=0, description="Seconds between readings of each engine's rope evidence (its /metrics), "
        "within the health checks; an engine that (re)joins is always read.")
    health_timeout_s: float = Field(2.0, gt=0, description="Timeout of one engine health check (GET /health).")
    eject_after_failures: int = Field(
        2, ge=1, description="Consecutive failed health checks after which an engine is taken out of "
        "rotation (a refused connection while forwarding a request takes it out at once). One passing "
        "check puts it back.")
    connect_timeout_s: float = Field(5.0, gt=0, description="Timeout for connecting to an engine.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for an engine's response, or for its next chunk when "
        "streaming (a 64k-token prompt takes minutes on CPU).")

    # --- embedded engine (used only when engine_urls is empty) -------------------------------------------
    model_dir: Path | None = Field(
        None, description="Model directory the embedded engine loads. Default: the prepared default model "
        f"({MODEL_NAME} under $ROPESERVE_CACHE, built on first use).")
    engine_port: int = Field(0, ge=0, le=65535, description="Port of the embedded engine on 127.0.0.1; 0 "
                             "picks a free one.")
    engine_python: str | None = Field(
        None, description="Python interpreter that runs the embedded engine. Default: the gateway's own.")
    engine_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="`--dtype` of the embedded engine. `auto`: bfloat16 where the CPU has native "
        "bfloat16 instructions (the `avx512_bf16` or `amx_bf16` flag in /proc/cpuinfo), float32 elsewhere, "
        "where vLLM's CPU engine runs bfloat16 about 4x slower; `ropeserve serve` logs the choice. Any "
        "other value is used as given.")
    engine_enforce_eager: bool = Field(
        False, description="Run the embedded engine in vLLM's eager mode (`--enforce-eager`). Default: vLLM's "
        "compiled mode, whose first start on CPU compiles (about a minute more than eager; later starts load "
        "the compiled model from vLLM's cache) and which decodes up to 1.8x faster (both are proven exact; "
        "docs/RESULTS.md).")
    engine_kvcache_gib: float = Field(
        4.0, gt=0, description="KV-cache size of the embedded CPU engine in GiB (VLLM_CPU_KVCACHE_SPACE). "
        "One full 65536-token request of the default model needs 1.4 GiB in bfloat16, 2.8 GiB in float32 "
        "(server/cpu_dtype.py); the default holds it in either with room to spare.")
    engine_extra_args: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra command-line arguments for the embedded engine, as one "
        "shell-quoted string (e.g. `--max-num-seqs 4`).")
    engine_start_timeout_s: float = Field(
        600.0, gt=0, description="Longest wait for the embedded engine to answer GET /health after a start.")
    engine_stop_timeout_s: float = Field(
        15.0, gt=0, description="Grace period after SIGTERM before the embedded engine's process group is "
        "killed.")
    engine_max_restarts: int = Field(
        5, ge=0, description="Restarts of an embedded engine that died, before the gateway gives up on it "
        "(the count resets after it has run for 10 minutes).")
    engine_restart_backoff_s: float = Field(
        2.0, gt=0, description="Delay before the first restart of a dead embedded engine; doubles with "
        "each further restart, up to 60 s.")

    # --- RoPE scaling (must match the engines; the embedded engine is configured from these) ---------------
    rope_method: str = Field("dynamic_yarn", description="RoPE scaling method served (a rope_ext method: "
                             + ", ".join(sorted(METHODS)) + "; `longrope` with external engines only, its "
                             "maximum factor max_position_embeddings / L).")
    rope_original_max_position: int = Field(
        8192, gt=0, description="The model's original (training) context L in tokens.")
    rope_max_factor: float = Field(
        8.0, ge=1, description="Largest scale factor served; the maximum context is floor(L * factor).")
    rope_buckets: Annotated[list[float] | None, NoDecode] = Field(
        None, description="Scale factors a request may run at (comma-separated, from 1 up to the maximum "
        "factor). Default: factors sqrt(2) apart up to the maximum factor (1, 1.41, 2, 2.83, 4, ...), the "
        "policy the evidence grid chose (docs/RESULTS.md).")
    rope_generation_reserve: int = Field(
        512, ge=0, description="Tokens assumed for generation when a request does not set max_tokens; under "
        "`recompute` and `rerotate`, how far ahead a request's first bucket looks (0: the bucket of the prompt alone, "
        "the paper's rule).")
    rope_finetuned_factor: float = Field(
        1.0, ge=1, description="Factor the model was fine-tuned at with YaRN; no request runs below it.")
    rope_growth: Literal["recompute", "reserve", "rerotate"] = Field(
        "recompute", description="How a request's generation is provided for. `recompute`: it starts at the factor "
        "of its prompt and its next tokens (at most the generation reserve) and, when it is about to outgrow that bucket, the engine computes it again at the bucket "
        "its length needs (vLLM's recompute preemption, exactly a fresh request at the new scale). `reserve`: "
        "its factor is chosen for prompt + max_tokens (or the generation reserve) up front and kept. `rerotate`: "
        "like `recompute`, but the engine re-rotates its cached keys instead (vLLM CPU only). x-rope-factor "
        "gives the starting factor, x-rope-factor-final the final one. The engines must be started with the "
        "same `growth` in rope_parameters (the embedded engine is).")
    rope_headroom: float = Field(
        1.0, ge=1, description="A length past L runs at the bucket that holds `headroom` times it (room to "
        "spare at the top of a bucket); lengths at or below L are unaffected.")
    rope_theta: float | None = Field(
        None, gt=1, description="RoPE base written into the embedded engine's rope_parameters. Default: "
        "rope_theta of the model's config.json.")

    # --- access ---------------------------------------------------------------------------------------
    api_keys: Annotated[list[SecretStr], NoDecode] = Field(
        default_factory=list, description="Accepted API keys (comma-separated). When any is set, every "
        "route except /healthz and /readyz needs `Authorization: Bearer <key>`. Never logged; prefer the "
        "environment or the config file to the flag, which other users can see in `ps`.")
    max_body_bytes: int = Field(
        16 * 1024 * 1024, gt=0, description="Largest request body accepted, in bytes (413 beyond).")
    cors_allow_origins: CommaList = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated). Empty: CORS off.")
    cors_allow_credentials: bool = Field(
        False, description="Let CORS requests carry credentials; not allowed with the origin `*`.")

    # --- passkey self-check -----------------------------------------------------------------------------
    passkey_cache_ttl_s: float = Field(
        30.0, ge=0, description="Seconds a passkey result is served again for the same (len, depth, seed); "
        "0 disables the cache.")

    @field_validator("engine_urls", "cors_allow_origins", "api_keys", mode="before")
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_commas(value)

    @field_validator("rope_buckets", mode="before")
    @classmethod
    def _buckets(cls, value: Any) -> Any:
        if isinstance(value, str):
            return _split_commas(value) or None
        return value

    @field_validator("engine_extra_args", mode="before")
    @classmethod
    def _shell_words(cls, value: Any) -> Any:
        return shlex.split(value) if isinstance(value, str) else value

    @field_validator("engine_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        cleaned: list[str] = []
        for url in urls:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"engine URL {url!r} must be an http:// or https:// URL with a host")
            url = url.rstrip("/")
            if url in cleaned:
                raise ValueError(f"engine URL {url!r} is listed twice")
            cleaned.append(url)
        return cleaned

    @field_validator("api_keys")
    @classmethod
    def _keys(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(not key.get_secret_value().strip() for key in keys):
            raise ValueError("API keys must not be empty")
        return keys

    @model_validator(mode="after")
    def _consistent(self) -> GatewaySettings:
        if self.cors_allow_credentials and "*" in self.cors_allow_origins:
            raise ValueError("cors_allow_credentials cannot be combined with the origin '*'")
        try:
            self.rope_scaling()
        except RopeConfigError as exc:
            raise ValueError(f"invalid RoPE settings: rope_{exc}") from None
        if self.rope_method == "longrope" and self.embedded:
            raise ValueError("rope_method longrope: a LongRoPE model (Phi-3) is served from its own config's factor "
                             "lists by an external engine (engine_urls, with ROPESERVE_DYNAMIC_ROPE=1); the embedded "
                             "default model has none")
        return self

    def rope_scaling(self) -> RopeScaling:
        """The :class:`rope_ext.RopeScaling` these settings describe (validated there)."""
        return RopeScaling(
            method=self.rope_method,
            original_max_position=self.rope_original_max_position,
            max_factor=self.rope_max_factor,
            buckets=tuple(self.rope_buckets) if self.rope_buckets else None,
            generation_reserve=self.rope_generation_reserve,
            finetuned_factor=self.rope_finetuned_factor,
            growth=self.rope_growth,
            headroom=self.rope_headroom,
        )

    @property
    def embedded(self) -> bool:
        """True when no engine URL is configured: the gateway runs its own engine."""
        return not self.engine_urls

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, ConfigFileSource(settings_cls)


class ConfigFileSource(PydanticBaseSettingsSource):
    """Values from the file named by the ``config`` field (set by a keyword, a flag or ROPESERVE_CONFIG).

    It runs after the keyword and environment sources, so it reads the path from their state and its
    values rank below theirs."""

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        raise NotImplementedError  # __call__ reads the whole file at once

    def __call__(self) -> dict[str, Any]:
        path = self.current_state.get("config")
        if not path:
            return {}
        return load_config_file(Path(path))


def load_config_file(path: Path) -> dict[str, Any]:
    """A YAML or JSON mapping of settings, chosen by the file's suffix."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ValueError(f"cannot read config file {path}: {exc.strerror}") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValueError(f"config file {path} is not valid YAML: {exc}") from None
    elif path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"config file {path} is not valid JSON: {exc}") from None
    else:
        raise ValueError(f"config file {path} must end in .yaml, .yml or .json")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of setting names to values")
    if "config" in data:
        raise ValueError(f"config file {path} must not name another config file")
    return data


# --- derived CLI flags and reference table ---------------------------------------------------------------

def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _type_name(annotation: Any) -> str:
    """A short, readable name of a field's type for the reference table."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _type_name(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(arg) for arg in typing.get_args(annotation))
    if origin is Literal:
        return " \\| ".join(repr(arg) for arg in typing.get_args(annotation))
    if origin is list:
        return f"list[{_type_name(typing.get_args(annotation)[0])}]"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def add_cli_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field (``--engine-urls``, ``--port``, ``--cors-allow-credentials`` /
    ``--no-cors-allow-credentials``), each defaulting to "not given" so lower sources still apply."""
    for name, field in GatewaySettings.model_fields.items():
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": field.description}
        if _is_bool(field.annotation):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["metavar"] = name.upper()
        parser.add_argument(flag_name(name), **kwargs)


def settings_from_cli(namespace: argparse.Namespace) -> GatewaySettings:
    """Settings with the flags given on the command line on top of environment and config file."""
    given = {name: value for name, value in vars(namespace).items() if name in GatewaySettings.model_fields}
    return GatewaySettings(**given)


def settings_markdown() -> str:
    """The reference table of every setting: name, environment variable, CLI flag, type, default, meaning."""
    lines = ["| setting | environment variable | CLI flag | type | default | description |",
             "|---|---|---|---|---|---|"]
    for name, field in GatewaySettings.model_fields.items():
        if field.default_factory is not None:
            default = field.default_factory()
        else:
            default = field.default
        shown = "(none)" if default is None or default == [] else f"`{default}`"
        description = (field.description or "").replace("|", "\\|")
        lines.append(f"| `{name}` | `{ENV_PREFIX}{name.upper()}` | `{flag_name(name)}` | "
                     f"{_type_name(field.annotation)} | {shown} | {description} |")
    return "\n".join(lines) + "\n"
