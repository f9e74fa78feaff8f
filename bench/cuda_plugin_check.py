"""Prepared check of the plugin's CUDA path: one short run on a GPU machine, results as JSON.

No weights can be carried to the GPU machine, so the model is a small Llama built on the spot from a
config (random weights: vLLM's ``load_format="dummy"`` initialises them from a fixed seed, so every
engine gets the same ones) and prompts are token ids (no tokenizer). Two parts:

1. Module: ``PerRequestRotaryEmbedding.forward_cuda`` (the stock CUDA kernel on stacked tables) on a flat
   batch mixing scales 1, 2 and 8, against the stock module of each token's scale (plain
   ``RotaryEmbedding``, ``YaRNScalingRotaryEmbedding``) and against ``forward_native``; fp32 and bf16.
2. Engine: ``vllm.LLM`` with the plugin against stock vLLM (unscaled, and static YaRN at factor 4) on the
   same inputs: a short prompt must match the unscaled model, a long one static YaRN at its factor.

    python bench/cuda_plugin_check.py --out "$OUT/cuda_check.json"     # on the GPU machine
    python bench/cuda_plugin_check.py --device cpu --skip-engine        # the same checks on CPU

The script exits 1 when a check fails; every number is in the JSON either way.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SMALL_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
    "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "head_dim": 64, "vocab_size": 1024, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
}
L = 512


def module_check(device: str) -> dict:
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding import RotaryEmbedding, YaRNScalingRotaryEmbedding

    from rope_ext import RopeScaling
    from rope_ext.vllm_plugin.rotary import PerRequestRotaryEmbedding

    results = {}
    with set_current_vllm_config(VllmConfig()), torch.device(device):
        for dtype in (torch.float32, torch.bfloat16):
            scaling = RopeScaling(method="dynamic_yarn", original_max_position=1024, max_factor=8.0)
            rows = scaling.max_context
            ours = PerRequestRotaryEmbedding(128, 128, 1e4, True, dtype, scaling=scaling, rows_per_bucket=rows,
                                             max_num_tokens=4096)
            stock = {1.0: RotaryEmbedding(128, 128, rows, 1e4, True, dtype)}
            stock.update({s: YaRNScalingRotaryEmbedding(128, 128, 1024, 1e4, True, s, dtype)
                          for s in scaling.buckets[1:]})
            gen = torch.Generator(device=device).manual_seed(0)
            factors = torch.tensor([1.0] * 100 + [2.0] * 120 + [8.0] * 80, device=device)
            positions = torch.cat([torch.arange(100), torch.arange(1500, 1620),
                                   torch.randint(0, rows, (80,), generator=gen, device=device)])
            ours.token_offsets[:300] = torch.tensor([ours.row_offset(float(f)) for f in factors])
            q = torch.randn(300, 8 * 128, generator=gen, device=device).to(dtype)
            k = torch.randn(300, 2 * 128, generator=gen, device=device).to(dtype)
            fast = "forward_cuda" if device.startswith("cuda") else "forward_cpu"
            q_fast, k_fast = getattr(ours, fast)(positions, q.clone(), k.clone())
            q_nat, k_nat = ours.forward_native(positions, q.clone(), k.clone())
            worst_stock = 0.0
            for s, module in stock.items():
                mask = factors == s
                if not mask.any():
                    continue
                q_ref, k_ref = getattr(module, fast)(positions[mask], q[mask].clone(), k[mask].clone())
                worst_stock = max(worst_stock, (q_fast[mask].float() - q_ref.float()).abs().max().item(),
                                  (k_fast[mask].float() - k_ref.float()).abs().max().item())
            worst_native = max((q_fast.float() - q_nat.float()).abs().max().item(),
                               (k_fast.float() - k_nat.float()).abs().max().item())
            # The kernel computes in float32, plain torch in the dtype: bf16 results near zero differ most.
            rtol, atol = (1.3e-6, 1e-5) if dtype == torch.float32 else (1.6e-2, 1e-2)
            close = (torch.allclose(q_fast.float(), q_nat.float(), rtol=rtol, atol=atol)
                     and torch.allclose(k_fast.float(), k_nat.float(), rtol=rtol, atol=atol))
            results[str(dtype)] = {"path": fast, "max_abs_vs_stock_per_scale": worst_stock,
                                   "max_abs_vs_native": worst_native, "native_rtol": rtol, "native_atol": atol,
                                   "passed": worst_stock == 0.0 and close}
    return results


def _engine_run(model_dir: str, overrides: dict | None, prompts: list[list[int]], max_model_len: int,
                env: dict | None = None) -> list[dict]:
    from server.offline import EngineSpec, Request, run_offline

    spec = EngineSpec(model=model_dir, dtype="float32", max_model_len=max_model_len, hf_overrides=overrides,
                      env={"VLLM_ALLOW_LONG_MAX_MODEL_LEN": "1", **(env or {})},
                      extra={"load_format": "dummy", "skip_tokenizer_init": True})
    requests = [Request(prompt_token_ids=p, max_tokens=8) for p in prompts]
    (batch,) = run_offline(spec, [requests], timeout=900)
    return [{"token_ids": r.token_ids, "logprobs": r.logprobs} for r in batch]


def engine_check(model_dir: str) -> dict:
    gen = torch.Generator().manual_seed(0)
    short = torch.randint(3, 1024, (200,), generator=gen).tolist()
    long = torch.randint(3, 1024, (1500,), generator=gen).tolist()  # 1508 tokens: factor 4 of L=512
    plugin = {"rope_parameters": {"rope_type": "dynamic_yarn", "rope_theta": 10000.0, "factor": 8.0,
                                  "original_max_position_embeddings": L}}
    yarn4 = {"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                 "original_max_position_embeddings": L}, "max_position_embeddings": 8 * L}
    stock = _engine_run(model_dir, None, [short, long], 8 * L)
    static = _engine_run(model_dir, yarn4, [short, long], 8 * L)
    ours = _engine_run(model_dir, plugin, [short, long], 8 * L)

    def diff(a, b):
        return {"tokens_equal": a["token_ids"] == b["token_ids"],
                "max_abs_logprob": max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"]))}

    short_vs_unscaled, long_vs_yarn4 = diff(ours[0], stock[0]), diff(ours[1], static[1])
    return {"short_vs_unscaled": short_vs_unscaled, "long_vs_static_yarn4": long_vs_yarn4,
            "passed": short_vs_unscaled["max_abs_logprob"] == 0.0 and long_vs_yarn4["max_abs_logprob"] == 0.0}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--skip-engine", action="store_true")
    args = parser.parse_args()
    report: dict = {"device": args.device, "torch": torch.__version__,
                    "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None}
    start = time.perf_counter()
    report["module"] = module_check(args.device)
    if not args.skip_engine:
        with tempfile.TemporaryDirectory() as model_dir:
            config = dict(SMALL_LLAMA)
            (Path(model_dir) / "config.json").write_text(json.dumps(config))
            report["engine"] = engine_check(model_dir)
    report["seconds"] = time.perf_counter() - start
    passed = all(r["passed"] for r in report["module"].values()) and report.get("engine", {}).get("passed", True)
    report["passed"] = passed
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
