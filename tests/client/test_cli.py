"""The ropeserve-client CLI, run through main(argv, transport=...) against the fake gateway: output,
exit codes, the server's error message on stderr, and the passkey sweep (rich and plain, CSV)."""

from __future__ import annotations

import csv

import httpx
import pytest

from ropeserve_client import Client, cli

from .fake_gateway import URL, error


@pytest.fixture
def run(gateway, capsys, monkeypatch):
    """run(*argv) -> (exit code, stdout, stderr), with no real sleeping between retries."""
    monkeypatch.setattr("time.sleep", lambda s: None)

    def _run(*argv: str):
        code = cli.main(["--url", URL, *argv], transport=httpx.MockTransport(gateway))
        out, err = capsys.readouterr()
        return code, out, err

    return _run


@pytest.fixture
def plain(monkeypatch):
    """As if rich were not installed."""
    monkeypatch.setattr(cli, "_load_rich", lambda: None)


def test_complete(run, gateway):
    code, out, err = run("complete", "The capital of France is", "--max-tokens", "5", "--rope-factor", "2")
    assert code == 0 and out == "Paris is the capital.\n"
    assert "x-rope-factor: 2" in err
    assert gateway.bodies("/v1/completions")[0]["rope_factor"] == 2.0


def test_complete_stream(run):
    code, out, err = run("complete", "p", "--stream", "--max-tokens", "3")
    assert code == 0 and out == "Paris is the\n" and "x-rope-factor: 1" in err


def test_complete_json_and_stdin(run, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin"))
    code, out, _ = run("--model", "m", "complete", "-", "--json", "--max-tokens", "1")
    assert code == 0 and '"text": "Paris"' in out


def test_chat_with_system(run, gateway):
    code, out, _ = run("--api-key", "k", "chat", "hello", "--system", "be brief", "--max-tokens", "2")
    assert code == 0 and out == "Paris is\n"
    assert gateway.bodies("/v1/chat/completions")[0]["messages"] == [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    assert gateway.requests[-1].headers["authorization"] == "Bearer k"


def test_chat_stream_json(run):
    code, out, _ = run("chat", "hello", "--stream", "--json", "--max-tokens", "1")
    lines = out.strip().splitlines()
    assert code == 0 and len(lines) == 2 and '"content":"Paris"' in lines[1]


def test_models(run):
    assert run("models")[:2] == (0, "SmolLM2-135M-Instruct\n")


def test_health(run, gateway):
    code, out, _ = run("health")
    assert code == 0 and "healthz: 200" in out and "readyz: 200" in out
    gateway.ready = False
    code, out, _ = run("health")
    assert code == 1 and "readyz: 503" in out


def test_server_error_reaches_stderr_intact(run, gateway):
    gateway.max_model_len = 4
    code, out, err = run("--retries", "0", "complete", "one two three", "--max-tokens", "5")
    assert code == 1 and out == ""
    assert err.strip() == ("error (ContextLengthExceededError 400 context_length_exceeded): This model's maximum "
                           "context length is 4 tokens. However, you requested 8 tokens (3 in the messages, 5 in "
                           "the completion).")


def test_retries_flag(run, gateway):
    gateway.queue("/v1/models", *[error(503, "warming up", "service_unavailable", None)] * 2)
    code, _, err = run("--retries", "1", "models")
    assert code == 1 and "warming up" in err and len(gateway.requests) == 2
    assert run("--retries", "-1", "models")[0] == 2


def test_usage_errors_exit_2(run):
    for argv in (["passkey", "--depths", "1.5"], ["passkey", "--lengths", "x"], ["passkey", "--lengths", ""], []):
        with pytest.raises(SystemExit) as info:
            run(*argv)
        assert info.value.code == 2


def test_url_from_environment(monkeypatch, gateway, capsys):
    monkeypatch.setenv("ROPESERVE_URL", "http://elsewhere.test:9")
    monkeypatch.setenv("ROPESERVE_API_KEY", "envkey")
    assert cli.main(["models"], transport=httpx.MockTransport(gateway)) == 0
    assert str(gateway.requests[-1].url) == "http://elsewhere.test:9/v1/models"
    assert gateway.requests[-1].headers["authorization"] == "Bearer envkey"


def test_int_lists():
    assert cli._ints("1k, 4096,8K") == [1024, 4096, 8192]


def test_sweep_points_order():
    assert cli.sweep_points([1, 2], [0.5], [0, 1]) == [(1, 0.5, 0), (1, 0.5, 1), (2, 0.5, 0), (2, 0.5, 1)]


def test_passkey_sweep_plain_with_csv(run, gateway, plain, tmp_path):
    path = tmp_path / "out.csv"
    code, out, err = run("passkey", "--lengths", "1k,16k", "--depths", "0.1,0.9", "--seeds", "0,1", "--csv", str(path))
    assert code == 0
    assert err.count("] len=") == 8 and "[8/8] len=16384 depth=0.9 seed=1: missed" in err
    header, rule, *rows = out.splitlines()[:10]
    assert header.split() == [cli.HEADERS.get(c, c) for c in cli.COLUMNS if c != "error"]  # no errors
    assert set(rule) == {"-", " "} and len(rows) == 8
    assert "passed 4/8 (1024: 4/4, 16384: 0/4)" in out
    with path.open() as f:
        records = list(csv.DictReader(f))
    assert [(r["length"], r["depth"], r["seed"], r["passed"]) for r in records[:2]] == [
        ("1024", "0.1", "0", "True"), ("1024", "0.1", "1", "True")]
    assert records[-1]["passed"] == "False" and records[-1]["rope_factor"] == "2.0"
    assert [r.url.params["len"] for r in gateway.requests] == ["1024"] * 4 + ["16384"] * 4


def test_passkey_sweep_rich(run, gateway):
    pytest.importorskip("rich")
    code, out, err = run("passkey", "--lengths", "1024", "--depths", "0.5")
    assert code == 0
    assert "passkey retrieval" in out and "1024" in out and "passed 1/1" in out


def test_passkey_strict_and_errors_recorded(run, gateway, plain):
    gateway.queue("/healthz/passkey", error(400, "len must be <= 65536", "invalid_request_error", "invalid_value"))
    code, out, err = run("passkey", "--lengths", "100k,1k", "--depths", "0.5", "--strict", "--no-progress")
    assert code == 1 and err == ""
    assert "BadRequestError: len must be <= 65536" in out  # the failed point is a row, the sweep went on
    assert "passed 1/2" in out


def test_format_table_and_summary():
    rows = [cli.SweepRow(1024, 0.5, 0, passed=True, answer="a\nb", latency_s=1.25),
            cli.SweepRow(2048, 0.5, 0, error="boom")]
    table = cli.format_table(rows)
    assert "a b" in table and "1.25" in table and "boom" in table and "yes" in table
    assert cli.summarize(rows) == "passed 1/2 (1024: 1/1, 2048: 0/1)"


def test_console_script_entry_point():
    from importlib.metadata import entry_points

    (ep,) = [e for e in entry_points(group="console_scripts") if e.name == "ropeserve-client"]
    assert ep.load() is cli.main
    assert Client  # the CLI is a thin layer over the same client


def test_a_long_check_shows_the_gateways_progress(gateway):
    """While the passkey request waits (no read timeout), the CLI polls /healthz/passkey/progress."""
    gateway.passkey_seconds = 0.5
    seen = []
    with Client(URL, transport=httpx.MockTransport(gateway), timeout=0.1) as client:
        row = cli.run_point(client, 4000, 0.5, 0, on_progress=seen.append, every_s=0.05)
    assert row.passed and row.error is None
    assert seen and seen[0] == "1,995/3,990 tokens (50%), 3 s, about 3 s left"
    assert cli.describe_progress({"computed_tokens": 0, "prompt_tokens": 0, "elapsed_s": 1}) == "0/0 tokens, 1 s"
