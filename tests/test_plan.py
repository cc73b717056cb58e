"""The memory planner: its items from shapes and shardings, bad input, the CLI, the refusal
before training, and its total against XLA's compiled figure (``memory_analysis``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from distill_jax import cli
from distill_jax import plan as PL
from distill_jax.config import load_run_config
from distill_jax.models import param_shapes

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
TINY = str(CONFIGS / "tiny.yaml")
# the reference pair of benchmarks/train_throughput.py, as overrides of the tiny config
REFERENCE = [
    "teacher.overrides={vocab_size: 32000, hidden_size: 512, intermediate_size: 1408, "
    "num_layers: 8, num_heads: 8, num_kv_heads: 4, head_dim: 64}",
    "student.overrides={vocab_size: 32000, hidden_size: 256, intermediate_size: 704, "
    "num_layers: 4, num_heads: 4, num_kv_heads: 2, head_dim: 64}",
    "data.batch_size=4", "data.seq_len=512", "loss.chunk_size=512",
    "loss.terms={forward_kl: 1.0}"]
ONE = ["mesh.num_devices=1"]


def test_plan_counts_params_optimizer_and_batch_exactly():
    cfg = load_run_config(TINY, ONE)
    plan = PL.plan_run(cfg)
    from distill_jax.train.build import model_config
    student = sum(int(np.prod(x.shape)) * x.dtype.itemsize
                  for x in _leaves(param_shapes(model_config(cfg.student))))
    assert plan.item("student params").bytes == student
    assert plan.item("optimizer state").bytes == pytest.approx(2 * student, abs=64)
    assert plan.item("gradients").bytes == student  # fp32 params, fp32 gradients
    assert plan.item("batch").bytes == 5 * 8 * 128 * 4  # five (rows, length) int32/fp32 keys
    resident = sum(plan.item(k).bytes for k in ("teacher params", "student params",
                                                 "optimizer state", "batch"))
    assert plan.total > resident + plan.item("activations").bytes
    assert plan.fits and plan.largest.name == "activations"
    assert "total (peak)" in plan.table() and "largest: activations" in plan.table()


def _leaves(tree):
    import jax
    return jax.tree.leaves(tree)


def test_simulated_fsdp_mesh_divides_every_param():
    """On a simulated 8-device fsdp mesh every tiny param (all carry ``embed``, which 8
    divides) is one eighth per device; with -1 resolved against the simulated count."""
    one = PL.plan_run(load_run_config(TINY, ONE))
    cfg = load_run_config(TINY, ["mesh.data=1", "mesh.fsdp=-1"])
    eight = PL.plan_run(cfg, devices=8)
    assert eight.mesh == (1, 8, 1)
    for item in ("student params", "teacher params", "gradients"):
        assert eight.item(item).bytes * 8 == one.item(item).bytes
    assert eight.item("batch").bytes * 8 == one.item("batch").bytes
    many = PL.plan_run(cfg, devices=400)  # a pod plan on a laptop: no devices are created
    assert many.mesh == (1, 400, 1)


def test_bad_device_kind_and_count_name_the_fix():
    cfg = load_run_config(TINY, ["mesh.fsdp=16"])
    with pytest.raises(PL.PlanError, match="--devices"):
        PL.plan_run(cfg, devices=12)
    with pytest.raises(PL.PlanError, match="use one of v5e.*--memory"):
        PL.plan_run(cfg, devices=16, device_kind="v9")
    assert PL.device_memory("v5e") == ("v5e", 16 * PL.GiB)
    assert PL.device_memory("cpu")[1] == PL.host_memory_bytes()


def test_onpolicy_plan_counts_the_rollout_kv_cache():
    cfg = load_run_config(str(CONFIGS / "onpolicy_tiny.yaml"), ONE)
    plan = PL.plan_run(cfg)
    # student: 1 layer, 1 kv head of 16, fp32; 8 rows of the longest bucket 384 + 24 new tokens
    assert plan.item("rollout KV cache").bytes == 2 * 1 * 8 * (384 + 24) * 1 * 16 * 4


def test_plan_command_prints_the_table_and_proposals(capsys):
    assert cli.main(["plan", TINY, "--devices", "8", "--device-kind", "v5e"]) == 0
    out = capsys.readouterr().out
    assert "total (peak)" in out and "v5e" in out and "fits" in out
    assert cli.main(["plan", TINY, "--devices", "8", "--memory", "0.002"]) == 1
    out = capsys.readouterr().out
    assert "does not fit" in out and "remat the student's layers (full)" in out
    assert "an int8 teacher" in out and "teacher.quantize=int8" in out
    assert "a LoRA student (rank 16)" in out and "student.lora.rank=16" in out
    assert cli.main(["plan", TINY, "--device-kind", "tpu9"]) == 2
    assert "unknown device kind 'tpu9'" in capsys.readouterr().err


def test_int8_teacher_is_planned_at_one_byte_a_weight():
    cfg = load_run_config(TINY, [])
    full = PL.plan_run(cfg).item("teacher params").bytes
    int8 = PL.plan_run(load_run_config(TINY, ["teacher.quantize=int8"])).item("teacher params")
    assert int8.bytes == full // 4 and "int8" in int8.note


def test_lora_student_plans_adapter_only_optimizer_state_and_gradients():
    from distill_jax.models import lora
    from distill_jax.train.build import model_config
    cfg = load_run_config(TINY, ONE + ["student.lora.rank=4"])
    plan = PL.plan_run(cfg)
    adapters = lora.num_adapter_params(model_config(cfg.student).replace(lora=cfg.student.lora))
    assert plan.item("gradients").bytes == adapters * 4
    assert 0 <= plan.item("optimizer state").bytes - 2 * adapters * 4 < 64  # moments + counters
    full = PL.plan_run(load_run_config(TINY, ONE))
    assert plan.item("optimizer state").bytes < full.item("optimizer state").bytes / 5
    assert plan.item("student params").bytes == full.item("student params").bytes + adapters * 4
    int8 = PL.plan_run(load_run_config(TINY, ONE + ["student.lora.rank=4", "student.quantize=int8"]))
    assert int8.item("student params").bytes == full.item("student params").bytes // 4 + adapters * 4


def test_train_refuses_a_run_that_does_not_fit(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr("distill_jax.train.loop.run", lambda cfg: calls.append(cfg))
    args = ["train", TINY, f"run_dir={tmp_path / 'run'}", "plan.memory_gib=0.001"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert "does not fit" in err and "plan.enforce=false" in err and len(err.splitlines()) == 1
    assert calls == []
    assert cli.main(args + ["plan.enforce=false"]) == 0
    assert cli.main(["train", TINY, f"run_dir={tmp_path / 'run'}"]) == 0  # host RAM: fits
    assert len(calls) == 2


@pytest.mark.parametrize("name,overrides", [
    ("tiny", ONE),
    ("reference, no remat", REFERENCE + ONE),
    ("reference, remat full", REFERENCE + ONE + ["student.remat=full"]),
    ("reference, data=8", REFERENCE + ["data.batch_size=8", "mesh.data=8"]),
    ("reference, LoRA rank 16", REFERENCE + ONE + ["student.lora.rank=16"]),
])
def test_plan_agrees_with_xla_within_10_percent(name, overrides, devices8):
    """The planned peak against XLA's for the compiled step (argument + output - alias + temp,
    per device), fp32 compute."""
    cfg = load_run_config(TINY, overrides)
    planned = PL.plan_run(cfg).total
    compiled = PL.xla_peak(cfg)["peak"]
    assert abs(planned / compiled - 1) < 0.10, (name, planned / 2**20, compiled / 2**20)


def test_plan_agrees_with_xla_under_fsdp(devices8):
    cfg = load_run_config(TINY, ["mesh.data=1", "mesh.fsdp=8"])
    planned = PL.plan_run(cfg).total
    compiled = PL.xla_peak(cfg)["peak"]
    assert abs(planned / compiled - 1) < 0.10, (planned / 2**20, compiled / 2**20)


@pytest.mark.parametrize("path", sorted(p.name for p in CONFIGS.glob("*.yaml")
                                        if not p.name.startswith("traces")))
def test_every_run_config_plans(path):
    """Every shipped run config plans without weights or devices (the full-size ones on a
    simulated 32-chip v5p pod), and the full-size recipes fit there."""
    cfg = load_run_config(str(CONFIGS / path), ["mesh.tensor=1"])
    plan = PL.plan_run(cfg, devices=32, device_kind="v5p")
    assert plan.total > 0 and all(i.bytes >= 0 for i in plan.items)
    if not path.endswith("tiny.yaml") and path.split("_to_")[0] in ("qwen2.5-7b", "llama3.1-8b"):
        assert plan.fits, plan.table()
