"""Settings: defaults, environment, config file (YAML/JSON), CLI flags and their precedence, validation,
secrets, and the generated reference table in docs/gateway.md."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from server.settings import GatewaySettings, add_cli_flags, flag_name, settings_from_cli, settings_markdown

REPO = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> GatewaySettings:
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    return settings_from_cli(parser.parse_args(list(argv)))


def test_defaults_describe_the_default_model() -> None:
    settings = GatewaySettings()
    assert settings.embedded and settings.host == "127.0.0.1" and settings.port == 8000
    scaling = settings.rope_scaling()
    assert (scaling.method, scaling.original_max_position, scaling.max_factor) == ("dynamic_yarn", 8192, 8.0)
    assert scaling.max_context == 65536 and scaling.buckets == (1.0, 2 ** 0.5, 2.0, 2 ** 1.5, 4.0, 2 ** 2.5, 8.0)
    assert settings.served_model_name == "SmolLM2-135M-Instruct"


def test_every_field_is_documented() -> None:
    for name, field in GatewaySettings.model_fields.items():
        assert field.description and len(field.description) > 15, name


def test_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ROPESERVE_ENGINE_URLS", "http://a:8100/, http://b:8100")
    monkeypatch.setenv("ROPESERVE_PORT", "9001")
    monkeypatch.setenv("ROPESERVE_ROPE_BUCKETS", "1,2,8")
    monkeypatch.setenv("ROPESERVE_CORS_ALLOW_CREDENTIALS", "true")
    monkeypatch.setenv("ROPESERVE_CORS_ALLOW_ORIGINS", "https://x.example")
    settings = GatewaySettings()
    assert settings.engine_urls == ["http://a:8100", "http://b:8100"] and not settings.embedded
    assert settings.port == 9001 and settings.rope_buckets == [1.0, 2.0, 8.0]
    assert settings.cors_allow_credentials is True


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_and_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, suffix: str) -> None:
    values = {"port": 7000, "host": "0.0.0.0", "log_level": "debug", "engine_urls": ["http://file:1"],
              "rope_buckets": [1, 4, 8]}
    path = tmp_path / f"gateway{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        import yaml

        path.write_text(yaml.safe_dump(values))
    monkeypatch.setenv("ROPESERVE_CONFIG", str(path))
    from_file = GatewaySettings()
    assert (from_file.port, from_file.host, from_file.log_level) == (7000, "0.0.0.0", "debug")
    assert from_file.engine_urls == ["http://file:1"] and from_file.rope_buckets == [1.0, 4.0, 8.0]
    monkeypatch.setenv("ROPESERVE_PORT", "7100")
    monkeypatch.setenv("ROPESERVE_HOST", "10.0.0.1")
    env_over_file = GatewaySettings()
    assert env_over_file.port == 7100 and env_over_file.host == "10.0.0.1" and env_over_file.log_level == "debug"
    flags_over_env = parse("--port", "7200", "--engine-urls", "http://flag:1,http://flag:2")
    assert flags_over_env.port == 7200 and flags_over_env.host == "10.0.0.1"
    assert flags_over_env.engine_urls == ["http://flag:1", "http://flag:2"] and flags_over_env.log_level == "debug"


def test_config_file_by_flag(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("port: 7300\napi_keys: [k1, k2]\n")
    settings = parse("--config", str(path))
    assert settings.port == 7300 and [k.get_secret_value() for k in settings.api_keys] == ["k1", "k2"]


@pytest.mark.parametrize("content,name,message", [
    ("port: [", "bad.yaml", "not valid YAML"),
    ("{port", "bad.json", "not valid JSON"),
    ("[1, 2]", "list.json", "mapping"),
    ("port = 1", "c.toml", ".yaml, .yml or .json"),
    ('{"config": "other.json"}', "nested.json", "another config file"),
    ('{"prot": 1}', "typo.json", "prot"),
])
def test_bad_config_files(tmp_path: Path, content: str, name: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError) as info:  # ValidationError is a ValueError too
        GatewaySettings(config=path)
    assert message in str(info.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read config file"):
        GatewaySettings(config=tmp_path / "absent.yaml")


def test_flags_exist_for_every_field() -> None:
    parser = argparse.ArgumentParser()
    add_cli_flags(parser)
    options = {option for action in parser._actions for option in action.option_strings}
    for name in GatewaySettings.model_fields:
        assert flag_name(name) in options
    assert "--no-cors-allow-credentials" in options
    assert parse("--cors-allow-origins", "https://a", "--cors-allow-credentials").cors_allow_credentials
    assert parse().port == 8000  # flags not given leave the lower sources alone


@pytest.mark.parametrize("overrides,message", [
    ({"engine_urls": "ftp://x"}, "http:// or https://"),
    ({"engine_urls": "http://a:1,http://a:1/"}, "listed twice"),
    ({"rope_max_factor": 8, "rope_buckets": "1,3"}, "rope_buckets"),
    ({"rope_method": "magic"}, "known methods"),
    ({"rope_method": "longrope", "rope_max_factor": 32}, "external engine"),
    ({"rope_method": "longrope", "rope_max_factor": 32, "rope_buckets": "1,4,32", "engine_urls": "http://a:1"},
     "rope_buckets"),
    ({"rope_finetuned_factor": 16}, "rope_finetuned_factor"),
    ({"cors_allow_origins": "*", "cors_allow_credentials": True}, "cannot be combined"),
    ({"port": 70000}, "port"),
    ({"api_keys": [" "]}, "must not be empty"),
    ({"max_body_bytes": 0}, "max_body_bytes"),
])
def test_invalid_settings(overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")):
        GatewaySettings(**overrides)


def test_api_keys_are_secret() -> None:
    settings = GatewaySettings(api_keys="sk-very-secret,sk-other-secret")
    for text in (repr(settings), str(settings), settings.model_dump_json()):
        assert "sk-very-secret" not in text and "sk-other-secret" not in text
    assert [k.get_secret_value() for k in settings.api_keys] == ["sk-very-secret", "sk-other-secret"]


def test_settings_are_frozen() -> None:
    with pytest.raises(ValidationError):
        GatewaySettings().port = 1  # type: ignore[misc]


def test_reference_table_lists_every_setting() -> None:
    table = settings_markdown()
    for name in GatewaySettings.model_fields:
        assert f"| `{name}` | `ROPESERVE_{name.upper()}` | `{flag_name(name)}` |" in table


@pytest.mark.parametrize("doc", ["docs/gateway.md", "README.md"])
def test_docs_carry_the_current_reference_table(doc) -> None:
    assert settings_markdown() in (REPO / doc).read_text(), "regenerate it: python scripts/settings_reference.py"


def test_longrope_behind_external_engines_chooses_the_short_or_the_long_table() -> None:
    """A Phi-3-128k served by external engines: the gateway's policy picks factor 1 (short factors) for a
    request that fits L and 32 (long factors) past it, as the engines' plugin does."""
    from rope_ext import choose_factor

    scaling = GatewaySettings(rope_method="longrope", rope_original_max_position=4096, rope_max_factor=32,
                              engine_urls="http://a:1").rope_scaling()
    assert scaling.buckets == (1.0, 32.0)
    assert choose_factor(3000, 500, scaling) == 1.0 and choose_factor(5000, 100, scaling) == 32.0
