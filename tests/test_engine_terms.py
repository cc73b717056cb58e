"""The loss-term registry: a term defined here (not in the library) trains end to end with its
own params, checkpointed and resumed; config checks and refusals come from the declarations."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import checkpoint
from distill_jax.config import load_run_config
from distill_jax.losses import kd, terms
from distill_jax.train.loop import run
from distill_jax.train.step import LOSS, MODEL

REPO = Path(__file__).resolve().parents[1]
TINYX = REPO / "configs" / "tiny_xtok.yaml"
PROBE = "boundary_probe"


def _probe_init(key, student_width, teacher_width, spec, dtype):
    return {"w": (jax.random.normal(key, (student_width,)) / student_width).astype(dtype),
            "b": jnp.zeros((), dtype)}


def _probe_sums(x: terms.HeadInputs) -> dict:
    """A linear probe on the student's hidden states predicting its own word-boundary
    probability at the next position (the target under stop_gradient), squared error summed
    over trained tokens: it trains the probe and, through the hidden states, the model."""
    _, boundary = x.student_token_stats
    p = x.params[PROBE]
    pred = x.student_h.astype(jnp.float32) @ p["w"].astype(jnp.float32) + p["b"]
    err = jnp.square(pred - jax.lax.stop_gradient(jnp.exp(boundary)))
    return {kd.sum_key(PROBE): jnp.sum(jnp.where(x.batch["loss_mask"] > 0, err, 0.0))}


def zlib_salt(name: str) -> int:
    """The default salt of a term's params key (a hash of its name)."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@pytest.fixture
def probe_term():
    term = terms.register_term(terms.Term(
        PROBE, needs=frozenset(), vocabulary=terms.ALIGNED, doc="a linear boundary probe",
        sums=_probe_sums, init_params=_probe_init))
    yield term
    terms.REGISTRY.pop(PROBE)


def _cfg(run_dir: Path, *overrides: str):
    return load_run_config(TINYX, [f"run_dir={run_dir}", "logging.every=1", "steps=4",
                                   "checkpoint.every=2", "logging.progress=false",
                                   "data.max_records=32", "data.batch_size=4",
                                   "mesh.num_devices=1", f"loss.terms={{alm: 1.0, {PROBE}: 0.5}}",
                                   *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_term_defined_outside_the_library_trains_checkpoints_and_resumes(tmp_path, probe_term):
    run(_cfg(tmp_path / "straight"))
    run(_cfg(tmp_path / "resumed"), max_steps_this_call=2)
    run(_cfg(tmp_path / "resumed"))
    a, b = _rows(tmp_path / "straight"), _rows(tmp_path / "resumed")
    assert [r["step"] for r in a] == [1, 2, 3, 4] and [r["step"] for r in b[-4:]] == [1, 2, 3, 4]
    for key in ("distill/loss", f"distill/{PROBE}", "distill/alm"):
        assert [r[key] for r in a] == [r[key] for r in b[-4:]], key
    assert a[-1][f"distill/{PROBE}"] < a[0][f"distill/{PROBE}"]
    state = checkpoint.load_state_dict(tmp_path / "straight" / "checkpoints")
    probe = state["params"][LOSS][PROBE]
    assert probe["w"].shape == (32,)
    fresh = _probe_init(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0x1A7E),
                                           zlib_salt(PROBE)), 32, 32, None, jnp.float32)
    assert float(jnp.max(jnp.abs(probe["w"] - fresh["w"]))) > 1e-5  # trained
    assert PROBE not in state["params"][MODEL]
    from distill_jax.export import load_student
    model, _ = load_student(tmp_path / "straight")
    assert set(model.params) == set(state["params"][MODEL])


def test_unknown_terms_suggest_the_closest_registered_one(probe_term):
    with pytest.raises(ValueError, match="Did you mean 'boundary_probe'"):
        load_run_config(TINYX, ["loss.terms={alm: 1.0, boundary_prob: 1.0}"]).loss.spec()
    with pytest.raises(ValueError, match="already registered"):
        terms.register_term(probe_term)


def test_cache_refusals_come_from_the_declared_needs(tmp_path):
    hidden = terms.register_term(terms.Term(
        "hidden_user_term", needs={terms.TEACHER_HIDDEN, terms.ALIGNMENT},
        vocabulary=terms.ALIGNED, sums=lambda x: {}))
    try:
        with pytest.raises(ValueError, match="hidden_user_term needs the teacher's hidden "
                                             "states, which a teacher cache"):
            run(_cfg(tmp_path, "loss.terms={alm: 1.0, hidden_user_term: 1.0}",
                     f"teacher.cache={tmp_path / 'no_cache'}"))
    finally:
        terms.REGISTRY.pop(hidden.name)
    # What each signal provides decides which terms it serves.
    assert terms.needs(["alm"]) <= terms.CACHED_SCALARS.provides
    assert not terms.needs(["alm_latents"]) <= terms.CACHED_SCALARS.provides
    assert terms.needs(["forward_kl", "cross_entropy"]) <= terms.CACHED_TOPK.provides
    assert not terms.needs(["forward_kl"]) <= terms.LIVE_ALIGNED.provides
    assert set(terms.CACHED_TOPK.batch_keys) >= {"teacher_topk_ids", "teacher_topk_logprobs"}


def test_pld_trains_from_a_teacher_cache(tmp_path):
    """Plackett-Luce distillation (a registered shared-vocabulary term) trains from a top-k
    cache, no teacher running."""
    from distill_jax.train.assemble import build_run_cache
    tiny = REPO / "configs" / "tiny.yaml"
    common = [f"run_dir={tmp_path / 'run'}", "logging.every=1", "steps=6",
              "checkpoint.every=100", "logging.progress=false", "data.max_records=32",
              "mesh.num_devices=1", "cache.k=16", f"teacher.cache={tmp_path / 'cache'}",
              "loss.terms={pld: 1.0}"]
    build_run_cache(load_run_config(tiny, common))
    run(load_run_config(tiny, common))
    rows = _rows(tmp_path / "run")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["distill/pld"]) and r["distill/pld"] > 0 for r in rows)
    assert rows[-1]["distill/pld"] < rows[0]["distill/pld"]


def test_gradmag_on_same_vocabulary_terms_follows_its_definition():
    """GradMag with forward_kl + cross_entropy: each term's weight is proportional to its
    configured weight over the norm of its gradient at the student's final hidden states
    (computed here from the plain, unchunked losses on full logits), rescaled to the configured
    total; an update with those weights is the gradient of the reweighted objective."""
    import optax
    from distill_jax import losses, models as M
    from distill_jax.losses.chunked import logits_from_hidden
    from distill_jax.train.step import init_state, make_step
    tc = M.ModelConfig.tiny("llama", num_layers=2)
    sc = M.ModelConfig.tiny("llama", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1)
    teacher, student = M.init(tc, 1), M.init(sc, 2)
    rng = np.random.RandomState(0)
    b, t, vocab = 4, 16, sc.vocab_size
    tokens = rng.randint(1, vocab, (b, t)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                 positions=np.arange(t)[None].repeat(b, 0).astype(np.int32),
                 segment_ids=np.ones((b, t), np.int32),
                 loss_mask=(rng.rand(b, t) > 0.3).astype(np.float32))
    weights = {"forward_kl": 1.0, "cross_entropy": 0.5}
    spec = losses.LossSpec(terms=weights, temperature=2.0, balance="gradmag")
    sgd = optax.sgd(1.0)
    step = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, sgd, chunk_size=24))
    state, metrics = step(init_state(student.params, sgd), teacher.params, batch)

    kw = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
    h = M.hidden_states(student, batch["tokens"], **kw)
    zt = M.forward(teacher, batch["tokens"], **kw)

    def term(name, h_):
        zs = logits_from_hidden(h_, M.lm_head(student))
        if name == "forward_kl":
            return losses.forward_kl(zs, zt, batch["loss_mask"], temperature=2.0)[0]
        return losses.cross_entropy(zs, batch["targets"], batch["loss_mask"])[0]

    raw = {n: w / float(jnp.linalg.norm(jax.grad(lambda h_: term(n, h_))(h)))
           for n, w in weights.items()}
    scale = sum(weights.values()) / sum(raw.values())
    for name in weights:
        got = float(metrics[f"distill/weight_{name}"])
        np.testing.assert_allclose(got, raw[name] * scale, rtol=1e-4)
    assert abs(sum(float(metrics[f"distill/weight_{n}"]) for n in weights) - 1.5) < 1e-5

    def objective(model_params):
        m = M.Model(sc, model_params)
        h_ = M.hidden_states(m, batch["tokens"], **kw)
        zs = logits_from_hidden(h_, M.lm_head(m))
        return (float(metrics["distill/weight_forward_kl"])
                * losses.forward_kl(zs, zt, batch["loss_mask"], temperature=2.0)[0]
                + float(metrics["distill/weight_cross_entropy"])
                * losses.cross_entropy(zs, batch["targets"], batch["loss_mask"])[0])

    grads = jax.grad(objective)(student.params)
    for p0, p1, g in zip(jax.tree.leaves(student.params), jax.tree.leaves(state.params[MODEL]),
                         jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(p0) - np.asarray(p1), np.asarray(g), atol=1e-6)


def _tiny_pair_and_batch(b=4, t=16):
    from distill_jax import models as M
    tc = M.ModelConfig.tiny("llama", num_layers=2)
    sc = M.ModelConfig.tiny("llama", num_layers=1, hidden_size=32, num_heads=2, num_kv_heads=1)
    rng = np.random.RandomState(0)
    tokens = rng.randint(1, sc.vocab_size, (b, t)).astype(np.int32)
    batch = dict(tokens=tokens, targets=np.roll(tokens, -1, 1),
                 positions=np.arange(t)[None].repeat(b, 0).astype(np.int32),
                 segment_ids=np.ones((b, t), np.int32),
                 loss_mask=(rng.rand(b, t) > 0.3).astype(np.float32))
    return sc, tc, M.init(tc, 1), M.init(sc, 2), batch


def _sampled_rows(vocab: int, batch: dict, rng) -> dict:
    """A stand-in for the student's own samples: fresh rows drawn with ``rng``."""
    tokens = jax.random.randint(rng, batch["tokens"].shape, 1, vocab, jnp.int32)
    return dict(batch, tokens=tokens, targets=jnp.roll(tokens, -1, 1))


def test_a_new_signal_is_a_declaration_with_a_prepare_hook():
    """A signal defined here (its rows drawn with the step's key, scored by the live teacher in
    row groups) trains through the unchanged step: the step's metrics are forward KL and
    cross-entropy of the plain, unchunked losses on the rows drawn with the documented key
    (the state's key folded with SIGNAL_SALT), the hook sees the student's current params,
    and another state key draws other rows."""
    import optax
    from distill_jax import losses, models as M
    from distill_jax.train.step import SIGNAL_SALT, init_state, make_step
    sc, tc, teacher, student, batch = _tiny_pair_and_batch()
    seen = {}

    def prepare(ctx, student_params, teacher_params, batch, rng):
        seen["student_embed"] = student_params["embed"].shape
        out = _sampled_rows(ctx.student_cfg.vocab_size, batch, rng)
        out["teacher_hidden"] = ctx.teacher_hidden(teacher_params, out)
        return out

    samples = terms.Signal("rows drawn at random, scored by a live teacher",
                           terms.LIVE_SAME.provides, terms.BATCH_KEYS, cached=False,
                           vocabulary=terms.SHARED, prepare=prepare)
    spec = losses.LossSpec(terms={"forward_kl": 1.0, "cross_entropy": 0.5})
    sgd = optax.sgd(0.1)
    step = jax.jit(make_step(sc, tc, spec, samples, sgd, grad_accum=2, chunk_size=24))
    state0 = init_state(student.params, sgd, seed=3)
    _, metrics = step(state0, teacher.params, batch)
    assert seen["student_embed"] == student.params["embed"].shape

    key = jax.random.fold_in(jax.random.wrap_key_data(state0.rng), SIGNAL_SALT)
    rows = _sampled_rows(sc.vocab_size, batch, key)
    kw = dict(positions=rows["positions"], segment_ids=rows["segment_ids"])
    zs = M.forward(student, rows["tokens"], **kw)
    zt = M.forward(teacher, rows["tokens"], **kw)
    kl = float(losses.forward_kl(zs, zt, rows["loss_mask"])[0])
    ce = float(losses.cross_entropy(zs, rows["targets"], rows["loss_mask"])[0])
    np.testing.assert_allclose(float(metrics["distill/forward_kl"]), kl, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill/cross_entropy"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(metrics["distill/loss"]), kl + 0.5 * ce, rtol=1e-5)

    other = init_state(student.params, sgd, seed=4)
    _, metrics_other = step(other, teacher.params, batch)
    assert float(metrics_other["distill/cross_entropy"]) != float(metrics["distill/cross_entropy"])


@pytest.mark.parametrize("accum", [1, 2])
def test_evaluation_is_the_training_objective_without_the_update(accum):
    """make_step without an optimizer returns (sums, counts) whose summary is exactly the
    metrics the training step reports for the same batch and params (before its update), with
    or without gradient accumulation."""
    import optax
    from distill_jax import losses
    from distill_jax.train.step import init_state, make_step
    from distill_jax import models as M
    sc, tc, teacher, student, batch = _tiny_pair_and_batch()
    # A confident teacher (its head x10): the random tiny teacher is nearly uniform, its KL to
    # the student ~0.016 nats a token, and a sum of such small differences of log-probs moves
    # by ~1e-6 relative when the matmuls see other row counts (the live teacher and the
    # student run in row groups of the micro-batches under accumulation); ~0.3 nats a token
    # makes the comparison meaningful at rtol 1e-6.
    teacher = M.Model(tc, {**teacher.params, "lm_head": teacher.params["lm_head"] * 10.0})
    spec = losses.LossSpec(terms={"forward_kl": 1.0, "cross_entropy": 0.5})
    sgd = optax.sgd(0.1)
    state0 = init_state(student.params, sgd)
    evaluate = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, chunk_size=24))
    sums, counts = evaluate(state0.params, teacher.params, batch)
    means = terms.summarize(spec, sums, counts)
    _, metrics = jax.jit(make_step(sc, tc, spec, terms.LIVE_SAME, sgd, grad_accum=accum,
                                   chunk_size=24))(state0, teacher.params, batch)
    assert set(means) <= set(metrics)
    for k, v in means.items():
        np.testing.assert_allclose(float(metrics[k]), float(v), rtol=1e-6, err_msg=k)
    assert float(counts["distill/tokens"]) == float(np.sum(batch["loss_mask"] > 0))
