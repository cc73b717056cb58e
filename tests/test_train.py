"""The training engine: config loading, optimiser, student init, the step, and whole runs
(mesh invariance, SIGKILL resume, two processes with jax.distributed)."""

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax import checkpoint, configlib, losses
from distill_jax import models as M
from distill_jax.config import RunConfig, load_run_config
from distill_jax.train import build, optim
from distill_jax.train.loop import run
from distill_jax.losses import terms
from distill_jax.train.step import init_state, make_step

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["distill/loss"] for r in rows}


def _tiny(tmp_path: Path, *overrides: str) -> RunConfig:
    return load_run_config(TINY, [f"run_dir={tmp_path}", "logging.every=1", "steps=10",
                                  "checkpoint.every=5", "logging.progress=false", *overrides])


# ----------------------------------------------------------------------------- config
def test_unknown_key_suggests_closest():
    with pytest.raises(configlib.ConfigKeyError, match="did you mean 'temperature'"):
        load_run_config(TINY, ["loss.temprature=2"])
    with pytest.raises(configlib.ConfigKeyError, match="expected an integer"):
        load_run_config(TINY, ["steps=many"])


def test_overrides_and_base(tmp_path):
    cfg = load_run_config(TINY, ["loss.temperature=2", "optimizer.lr=1e-2",
                                 "data.sources=[{path: a.jsonl, weight: 2}]"])
    assert cfg.loss.temperature == 2.0 and cfg.optimizer.lr == 0.01
    assert cfg.data.sources[0].path == "a.jsonl" and cfg.data.sources[0].weight == 2.0
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {TINY}\nsteps: 3\nloss: {{temperature: 4.0}}\n")
    cfg = load_run_config(child)
    assert cfg.steps == 3 and cfg.loss.temperature == 4.0
    assert cfg.loss.terms == {"forward_kl": 1.0, "cross_entropy": 0.1}  # merged, not replaced


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads_and_full_shapes_check(path):
    """Every shipped config parses; its models' shapes are checked by eval_shape (nothing is
    allocated), and a realistic config names presets that match what it will load."""
    header = path.read_text().splitlines()[:12]
    if path.name.startswith("traces"):  # a trace-generation config, not a training run
        from distill_jax.traces.config import load_traces_config
        cfg = load_traces_config(path)
        assert any(f"distill-jax traces configs/{path.name}" in line for line in header), \
            "each config's header shows its launch command"
    else:
        cfg = load_run_config(path)
        assert any("distill-jax train configs/" in line or "launch/" in line for line in header), \
            "each config's header shows its launch command"
    for src in (cfg.teacher, getattr(cfg, "student", None)):
        if src is None or getattr(src, "init", None) in ("teacher_layers", "transfer"):
            continue  # derived from the teacher (checked by the teacher's own shapes)
        assert src.preset, f"{path.name}: every model names a preset (its architecture)"
        mcfg = build.model_config(dataclasses.replace(src, hf_path=None))
        shapes = jax.eval_shape(lambda: M.init(mcfg, 0).params)
        n = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(shapes))
        assert n == mcfg.num_params()


def test_full_size_presets_param_counts():
    from distill_jax.models import presets
    # Reference counts of the released checkpoints.
    expected = {"llama-3.1-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512,
                "gemma2-9b": 9_241_705_984, "qwen2.5-0.5b": 494_032_768,
                "llama-3.2-1b": 1_235_814_400, "gemma2-2b": 2_614_341_888}
    for name, count in expected.items():
        assert presets.preset(name).num_params() == count, name


# ----------------------------------------------------------------------------- optimiser
def test_schedule_warmup_then_decay():
    cfg = optim.OptimizerConfig(lr=1.0, warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    s = optim.make_schedule(cfg, 110)
    assert float(s(0)) == 0.0 and abs(float(s(10)) - 1.0) < 1e-6
    assert abs(float(s(110)) - 0.1) < 1e-6 and float(s(60)) < 1.0
    lin = optim.make_schedule(optim.OptimizerConfig(lr=1.0, schedule="linear", min_lr_ratio=0.0), 100)
    assert abs(float(lin(50)) - 0.5) < 1e-6


def test_weight_decay_mask_skips_norms_and_biases():
    params = M.init(M.ModelConfig.tiny("qwen2"), 0).params
    mask = optim.decay_mask(params)
    assert mask["layers"]["attn"]["q"] and mask["embed"] and mask["layers"]["mlp"]["up"]
    assert not mask["layers"]["attn_norm"]["scale"] and not mask["final_norm"]["scale"]
    assert not mask["layers"]["attn"]["q_bias"]


# ----------------------------------------------------------------------------- student init
def test_student_from_teacher_layers(devices8):
    from distill_jax import sharding
    mesh = sharding.make_mesh(devices=devices8[:1])
    teacher = M.init(M.ModelConfig.tiny("gemma2", num_layers=4), 0, mesh=mesh)
    student = build.keep_layers(teacher, (0, 3), mesh)
    assert student.config.num_layers == 2
    assert student.config.layer_types == (teacher.config.layer_types[0], teacher.config.layer_types[3])
    np.testing.assert_array_equal(np.asarray(student.params["layers"]["mlp"]["up"][1]),
                                  np.asarray(teacher.params["layers"]["mlp"]["up"][3]))
    with pytest.raises(ValueError, match="out of range"):
        build.keep_layers(teacher, (0, 7), mesh)


# ----------------------------------------------------------------------------- the step
def _batch(rng, b=4, t=16, vocab=256):
    tok = rng.randint(1, vocab, (b, t)).astype(np.int32)
    seg = np.ones((b, t), np.int32)
    seg[:, t // 2:] = 2
    pos = np.concatenate([np.arange(t // 2)] * 2)[None].repeat(b, 0).astype(np.int32)
    mask = (rng.rand(b, t) > 0.3).astype(np.float32)
    return dict(tokens=tok, targets=np.roll(tok, -1, 1), positions=pos, segment_ids=seg,
                loss_mask=mask)


def test_teacher_is_frozen_and_accumulation_exact():
    """Gradient accumulation over 1, 2 or 4 micro-batches gives the same update.

    Compared through SGD (lr 1: the update is minus the gradient), where fp32 summation-order
    differences stay at rounding level; AdamW would divide near-zero gradients by their own
    magnitude and turn that rounding into 1e-5 differences of the params."""
    tc = M.ModelConfig.tiny("llama", num_layers=2)
    sc = M.ModelConfig.tiny("llama", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1)
    teacher, student = M.init(tc, 1), M.init(sc, 2)
    teacher_before = jax.tree.map(np.asarray, teacher.params)
    spec = losses.LossSpec(terms={"forward_kl": 1.0, "cross_entropy": 0.5}, temperature=2.0)
    sgd = optax.sgd(1.0)
    batch = _batch(np.random.RandomState(0))
    finals = []
    for accum in (1, 2, 4):
        state = init_state(student.params, sgd)
        step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, sgd, grad_accum=accum, chunk_size=24))
        state, metrics = step(state, teacher.params, batch)
        finals.append((state.params, {k: float(v) for k, v in metrics.items()}))
    for params, m in finals[1:]:
        for a, b in zip(jax.tree.leaves(finals[0][0]), jax.tree.leaves(params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
        assert abs(m["distill/loss"] - finals[0][1]["distill/loss"]) < 1e-6
    assert finals[0][1]["distill/tokens"] == batch["loss_mask"].sum()
    # Three AdamW steps: the teacher is untouched and the optimiser state holds the student's
    # shapes only (no teacher moments).
    opt = optim.make_optimizer(optim.OptimizerConfig(lr=1e-3), 10)
    state = init_state(student.params, opt)
    step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=24))
    for _ in range(3):
        state, _ = step(state, teacher.params, batch)
    for a, b in zip(jax.tree.leaves(teacher_before), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size") and x.ndim)
    assert n_opt == 2 * sum(x.size for x in jax.tree.leaves(state.params))


def test_step_matches_unchunked_loss_gradient():
    """The first update equals optax applied to the gradient of the plain (unchunked) loss."""
    tc, sc = M.ModelConfig.tiny("gemma2"), M.ModelConfig.tiny("gemma2", num_layers=1)
    teacher, student = M.init(tc, 1), M.init(sc, 2)
    spec = losses.LossSpec(terms={"reverse_kl": 1.0}, temperature=1.5)
    opt = optax.sgd(0.1)
    batch = _batch(np.random.RandomState(1))

    def plain(params):
        s = M.forward(M.Model(sc, params), batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
        t = M.forward(teacher, batch["tokens"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"])
        return losses.combined_loss(s, t, None, batch["loss_mask"], spec)[0]

    grads = jax.grad(plain)(student.params)
    expected = jax.tree.map(lambda p, g: p - 0.1 * g, student.params, grads)
    state, _ = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=10))(
        init_state(student.params, opt), teacher.params, batch)
    for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_step_computes_the_head_gradient_in_the_forward_scan(monkeypatch):
    """A training step with fixed weights announces its cotangent, so the lm_head + loss scan's
    backward never recomputes a chunk (each chunk's backward ran in the forward scan)."""
    from distill_jax.losses import chunked
    tc, sc = M.ModelConfig.tiny(), M.ModelConfig.tiny(num_layers=1)
    teacher, student = M.init(tc, 1), M.init(sc, 2)
    batch = _batch(np.random.RandomState(3))
    calls = []
    monkeypatch.setattr(chunked, "on_recompute", lambda: calls.append(1))
    spec = losses.LossSpec(terms={"forward_kl": 1.0, "cross_entropy": 0.5})
    opt = optax.sgd(0.1)
    for accum in (1, 2):
        step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=16,
                                 grad_accum=accum))
        _, metrics = step(init_state(student.params, opt), teacher.params, batch)
        jax.block_until_ready(metrics)
    jax.effects_barrier()
    assert not calls


# ----------------------------------------------------------------------------- whole runs
def test_tiny_run_learns_and_writes_run_dir(tmp_path):
    cfg = _tiny(tmp_path, "steps=12", "logging.tensorboard=true", "eval.every=6",
                "eval.batches=2", f"eval.sources=[{{path: {REPO}/configs/data/math_test.jsonl}}]")
    last = run(cfg)
    curve = _losses(tmp_path)
    assert curve[12] < curve[1]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert sorted(evals) == [6, 12] and evals[12] < evals[6]
    assert [r["step"] for r in rows] == list(range(1, 13))  # one record per step
    assert (tmp_path / "config.yaml").exists() and list((tmp_path / "tensorboard").iterdir())
    assert checkpoint.latest_step(tmp_path / "checkpoints") == 12
    assert set(last) >= {"distill/loss", "train/grad_norm", "train/lr", "perf/tokens_per_sec",
                         "data/bad_records"}
    # A changed recipe in the same run directory is refused.
    with pytest.raises(ValueError, match="different config.*loss.temperature: 1.0 -> 3.0"):
        run(_tiny(tmp_path, "steps=12", "loss.temperature=3.0"))


@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 2, 4), (1, 8, 1)])
def test_mesh_shapes_give_single_device_curve(tmp_path, devices8, mesh, request):
    ref_dir = tmp_path.parent / "single_device_reference"
    if not (ref_dir / "metrics.jsonl").exists():
        run(_tiny(ref_dir, "mesh.num_devices=1", "mesh.data=1"))
    run(_tiny(tmp_path, f"mesh.data={mesh[0]}", f"mesh.fsdp={mesh[1]}", f"mesh.tensor={mesh[2]}"))
    ref, got = _losses(ref_dir), _losses(tmp_path)
    assert sorted(ref) == sorted(got) == list(range(1, 11))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-5, (step, ref[step], got[step])


# ----------------------------------------------------------------------------- processes
def _env(devices: int, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DISTILL_JAX_")}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
    env.update(extra)
    return env


def _cli(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "distill_jax.cli", "train", str(TINY), f"run_dir={run_dir}",
            "logging.every=1", "logging.progress=false", *overrides]


def _final_params(run_dir: Path) -> dict:
    return checkpoint.load_state_dict(run_dir / "checkpoints")["params"]


def _assert_same_params(a: dict, b: dict, atol: float) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    args = ("steps=40", "checkpoint.every=4")
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(full, *args), env=_env(2), check=True, cwd=REPO, capture_output=True)
    proc = subprocess.Popen(_cli(killed, *args), env=_env(2), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        metrics = killed / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 14:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    interrupted_at = checkpoint.latest_step(killed / "checkpoints")
    assert interrupted_at is not None and interrupted_at < 40
    subprocess.run(_cli(killed, *args), env=_env(2), check=True, cwd=REPO, capture_output=True)
    assert checkpoint.latest_step(killed / "checkpoints") == 40
    _assert_same_params(_final_params(full), _final_params(killed), atol=1e-6)
    # The resumed run logged the steps after its checkpoint again, with the same losses.
    full_curve, resumed = _losses(full), _losses(killed)
    for step, loss in resumed.items():
        assert abs(loss - full_curve[step]) <= 1e-6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(run_dir: Path, *overrides: str) -> None:
    port = _free_port()
    procs = [subprocess.Popen(
        _cli(run_dir, *overrides), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env=_env(4, DISTILL_JAX_COORDINATOR=f"127.0.0.1:{port}", DISTILL_JAX_NUM_PROCESSES="2",
                 DISTILL_JAX_PROCESS_ID=str(i))) for i in range(2)]
    outs = [p.communicate(timeout=600)[0].decode() for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


@pytest.mark.slow
def test_two_processes_match_one_process_and_resume_together(tmp_path):
    args = ("steps=8", "checkpoint.every=4", "mesh.data=2", "mesh.fsdp=4", "data.num_shards=2")
    single, multi = tmp_path / "single", tmp_path / "multi"
    subprocess.run(_cli(single, *args), env=_env(8), check=True, cwd=REPO, capture_output=True)
    _two_processes(multi, *args)
    ref, got = _losses(single), _losses(multi)
    assert sorted(got) == list(range(1, 9))
    for step in ref:
        assert abs(ref[step] - got[step]) <= 1e-5, (step, ref[step], got[step])
    _assert_same_params(_final_params(single), _final_params(multi), atol=1e-5)
    # Both processes restore step 4 together (params, optimiser, data position) and finish.
    import shutil
    shutil.rmtree(multi / "checkpoints" / "8")
    _two_processes(multi, *args)
    assert checkpoint.latest_step(multi / "checkpoints") == 8
    _assert_same_params(_final_params(single), _final_params(multi), atol=1e-5)


def test_cached_teacher_step_equals_live_teacher_at_full_k():
    """With k = vocab, the step fed a cached top-k teacher equals the live-teacher step.

    Three SGD steps (the update is -0.1 x the gradient, so the two paths' fp32 summation-order
    differences stay at rounding level instead of being divided by near-zero gradient
    magnitudes as AdamW does): losses and params agree to 1e-6 at every step."""
    from distill_jax.losses.sparse import topk_from_logits
    tc = M.ModelConfig.tiny("gemma2", vocab_size=97)
    sc = M.ModelConfig.tiny("gemma2", vocab_size=97, num_layers=1)
    teacher, student = M.init(tc, 1), M.init(sc, 2)
    spec = losses.LossSpec(terms={"forward_kl": 1.0, "jsd": 0.5, "cross_entropy": 0.1},
                           temperature=2.0)
    opt = optax.sgd(0.1)
    batch = _batch(np.random.RandomState(2), vocab=97)
    logits = M.forward(teacher, batch["tokens"], positions=batch["positions"],
                       segment_ids=batch["segment_ids"])
    ids, logprobs, tail = topk_from_logits(logits, 97, temperature=2.0)
    cached = dict(batch, teacher_topk_ids=np.asarray(ids), teacher_topk_logprobs=np.asarray(logprobs),
                  teacher_tail_logmass=np.asarray(tail))
    live_step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, opt, chunk_size=20))
    cache_step = jax.jit(make_step(sc, None, spec, terms.CACHED_TOPK, opt, chunk_size=20,
                                   tail="bucket"))
    s_live, s_cache = init_state(student.params, opt), init_state(student.params, opt)
    for _ in range(3):
        s_live, m_live = live_step(s_live, teacher.params, batch)
        s_cache, m_cache = cache_step(s_cache, None, cached)
        assert abs(float(m_live["distill/loss"]) - float(m_cache["distill/loss"])) <= 1e-6
        for a, b in zip(jax.tree.leaves(s_live.params), jax.tree.leaves(s_cache.params)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                zip(jax.tree.leaves(s_live.params), jax.tree.leaves(student.params)))
    assert moved > 1e-3  # the steps really moved the params


def test_training_from_full_k_cache_matches_live_teacher(tmp_path):
    """k = the whole (byte) vocabulary, fp32 log-probs: training from the cache reproduces the
    live-teacher loss curve; a cache built for other data is refused."""
    from distill_jax.train.assemble import build_run_cache
    common = ["data.max_records=48", "data.seq_len=1024", "data.batch_size=8", "steps=6",
              "cache.k=259", "cache.logprob_encoding=f32", "loss.chunk_size=512"]
    cache_dir = tmp_path / "cache"
    build_run_cache(_tiny(tmp_path / "build", *common, f"teacher.cache={cache_dir}"))
    run(_tiny(tmp_path / "live", *common))
    run(_tiny(tmp_path / "cached", *common, f"teacher.cache={cache_dir}"))
    live, cached = _losses(tmp_path / "live"), _losses(tmp_path / "cached")
    assert sorted(live) == sorted(cached) == list(range(1, 7))
    for step in live:
        assert abs(live[step] - cached[step]) <= 1e-5, (step, live[step], cached[step])
    from distill_jax.cache.store import CacheMismatchError
    with pytest.raises(CacheMismatchError, match="dataset"):
        run(_tiny(tmp_path / "other", *common, "data.max_records=40", f"teacher.cache={cache_dir}"))
