"""bench/device_check.py, the torch-only check prepared for a GPU machine without vLLM, run here on the CPU:
every check passes (the CUDA-graph stage is reported as skipped) and the JSON holds every stage."""

from __future__ import annotations

import json

from bench import device_check


def test_the_device_check_passes_on_the_cpu(tmp_path, capsys):
    out = tmp_path / "device_check.json"
    assert device_check.main(["--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [s["stage"] for s in report["stages"]] == ["tables", "lookup", "rerotate"]
    checks = [c for c in report["checks"] if "passed" in c]
    assert len(checks) == 7 and all(c["passed"] for c in checks)
    assert [c["stage"] for c in report["checks"] if "skipped" in c] == ["graph", "graph"]
    assert "7 passed, 0 failed" in capsys.readouterr().out


def test_a_wrong_scale_would_fail_it():
    """A token read at another bucket's rows is off by far more than the float32 tolerance, and by more
    than the bfloat16 one even at small positions (the attention factors alone differ by 0.14)."""
    import torch

    positions = torch.arange(100, 200)
    at_2, at_8 = device_check.reference_rows(2.0, positions), device_check.reference_rows(8.0, positions)
    wrong = float((at_2 - at_8).abs().max())
    assert wrong > 1000 * device_check.ROTATE_TOL[torch.float32] and wrong > device_check.ROTATE_TOL[torch.bfloat16]
