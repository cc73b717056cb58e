"""benchmarks/gpu_scale.py at its --smoke shapes on CPU: every signal runs and reports its
fields; FLOPs per token match a hand count; a setting that does not fit is refused in one line."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_benchmark



@pytest.fixture(scope="module")
def bench():
    return load_benchmark("gpu_scale")


def test_flops_per_token_match_a_hand_count(bench):
    from distill_jax.models import ModelConfig
    # student: d=8, 2 layers, 2 heads (1 kv) of 4, mlp 16, vocab 32; teacher: 3 layers
    s = ModelConfig.tiny("llama", vocab_size=32, hidden_size=8, intermediate_size=16,
                         num_layers=2, num_heads=2, num_kv_heads=1, head_dim=4)
    t = ModelConfig.tiny("llama", vocab_size=32, hidden_size=12, intermediate_size=24,
                         num_layers=3, num_heads=2, num_kv_heads=1, head_dim=4)
    # per layer: q and o 2 x (d x 2 x 4), k and v 2 x (d x 1 x 4), mlp 3 x d x f; + lm_head v x d
    s_matmul = 2 * (8 * 8 * 2 + 8 * 4 * 2 + 3 * 8 * 16) + 32 * 8  # 1,408
    t_matmul = 3 * (12 * 8 * 2 + 12 * 4 * 2 + 3 * 12 * 24) + 32 * 12  # 3,408
    length = 10
    s_attn = 4 * 2 * 2 * 4 * length  # QK^T + PV: 4 x layers x heads x head_dim x length
    t_attn = 4 * 3 * 2 * 4 * length
    live = bench.flops_per_token(s, t, length)
    assert live == {"matmul": 6 * s_matmul + 2 * t_matmul, "attention": 3 * s_attn + t_attn,
                    "total": 6 * s_matmul + 2 * t_matmul + 3 * s_attn + t_attn}
    assert bench.flops_per_token(s, None, length)["total"] == 6 * s_matmul + 3 * s_attn


def test_nominal_peaks_by_device_kind(bench):
    assert bench.nominal_peak("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.nominal_peak("NVIDIA H100 PCIe") == 756e12
    assert bench.nominal_peak("NVIDIA H200") == 989e12
    assert bench.nominal_peak("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.nominal_peak("TPU v5 lite") == 197e12
    assert bench.nominal_peak("TPU v5p") == 459e12
    assert bench.nominal_peak("TPU v4") == 275e12
    assert bench.nominal_peak("TPU v6 lite") == 918e12
    assert bench.nominal_peak("cpu") is None


def test_smoke_run_reports_every_signal(bench, tmp_path, capsys):
    out = tmp_path / "r.json"
    assert bench.main(["--smoke", "--steps", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert json.loads(capsys.readouterr().out) == result
    assert result["device"] and result["jax"] and result["devices"] >= 1
    assert result["setting"]["length"] == 128 and result["setting"]["smoke"]
    assert result["measured_peak_flops"] > 0 and result["nominal_peak_flops"] is None  # cpu
    assert 0 < result["plan_total_bytes"] <= result["device_memory_bytes"]
    assert set(result["results"]) == {"live", "cached", "onpolicy"}
    for name, r in result["results"].items():
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["compile_s"] > 0, name
    live, cached = result["results"]["live"], result["results"]["cached"]
    for r in (live, cached):
        fpt = r["flops_per_token"]["total"]
        assert r["achieved_flops"] == pytest.approx(r["tokens_per_s"] * fpt)
        assert r["mfu_measured_peak"] == pytest.approx(
            r["achieved_flops"] / result["measured_peak_flops"])
    # the cached step counts the student alone: fewer FLOPs per token than with the teacher
    assert cached["flops_per_token"]["total"] < live["flops_per_token"]["total"]
    assert cached["k"] == 64
    assert result["results"]["onpolicy"]["new_tokens"] == 16
    assert result["results"]["onpolicy"]["mfu_measured_peak"] is None


def test_a_setting_that_does_not_fit_is_refused_in_one_line(bench, capsys):
    assert bench.main(["--smoke", "--signals", "live", "--memory", "0.001"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("gpu_scale: the memory plan needs") and "--remat" in err[-1]
    assert "Traceback" not in "\n".join(err)
