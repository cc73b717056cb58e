"""Cross-tokenizer training: ALM (+ sft) from a live teacher and from a cache, exact gradient
accumulation, held-out evaluation, and clear refusals."""

import dataclasses
import json
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

from distill_jax.config import load_run_config
from distill_jax.tokenizer import load_tokenizer
from distill_jax.train import assemble, build, optim
from distill_jax.train.loop import run
from distill_jax.train.assemble import RunSetup, teacher_tokenizer
from distill_jax.train.step import LOSS, MODEL, init_loss_params, init_state

REPO = Path(__file__).resolve().parents[1]
TINYX = REPO / "configs" / "tiny_xtok.yaml"
HELDOUT = f"eval.sources=[{{path: {REPO}/configs/data/math_test.jsonl}}]"


def _cfg(tmp_path: Path, *overrides: str):
    return load_run_config(TINYX, [f"run_dir={tmp_path}", "logging.every=1", "steps=6",
                                   "checkpoint.every=3", "logging.progress=false",
                                   "data.max_records=64", "mesh.num_devices=1", *overrides])


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_xtok_run_learns_and_evaluates(tmp_path):
    run(_cfg(tmp_path, "steps=10", "eval.every=5", "eval.batches=1", HELDOUT))
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[-1]["distill/loss"] < rows[0]["distill/loss"]
    assert rows[-1]["distill/alm"] < rows[0]["distill/alm"]
    for r in rows:
        assert r["distill/alm_chunks"] > 0 and r["distill/tokens"] > 0
        assert np.isfinite(r["distill/alm"]) and np.isfinite(r["distill/sft"])
    evals = {r["step"]: r for r in rows if "eval/alm" in r}
    assert sorted(evals) == [5, 10] and evals[10]["eval/loss"] < evals[5]["eval/loss"]


def _one_batch_setup(tmp_path, *overrides):
    cfg = _cfg(tmp_path, *overrides)
    mesh, rules = build.make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.tokenizer_path())
    teacher_tok = teacher_tokenizer(cfg, tokenizer)
    teacher = build.load_model(cfg.teacher, mesh, rules)
    student = assemble.build_student(cfg.student, teacher, mesh, rules)
    setup = RunSetup(cfg, cfg.loss.spec(), tokenizer, teacher_tok, student.config, teacher.config,
                     False)
    iterator = setup.data_iterator(cfg.data)
    batch = {k: np.asarray(v) for k, v in next(iterator).items() if k in setup.keys}
    iterator.close()
    return cfg, setup, teacher, student, batch


NARROW = "student.overrides.hidden_size=16"  # the student narrower than the teacher (32)


@pytest.mark.parametrize("terms", ["{alm: 1.0, sft: 0.1}", "{alm: 1.0, uld: 0.5, mined: 0.5}",
                                   "{alm: 1.0, alm_latents: 0.5}", "{sft: 1.0, dskd: 0.5}"])
def test_xtok_grad_accumulation_is_exact(tmp_path, terms):
    small = ["data.batch_size=2", "data.seq_len=128", "data.teacher_seq_len=64"] \
        if "uld" in terms else []  # the baselines sort full distributions: keep them small
    if "latents" in terms or "dskd" in terms:
        small = [NARROW]  # with projectors
    cfg, setup, teacher, student, batch = _one_batch_setup(tmp_path, f"loss.terms={terms}", *small)
    # SGD with lr 1 (the update is minus the gradient): the split's fp32 summation-order
    # differences stay at rounding level, where AdamW would divide near-zero gradients by
    # their own magnitude.
    opt = optax.sgd(1.0)
    loss_params = init_loss_params(setup.spec, student.config, teacher.config, student.params)
    assert ("alm_latents" in loss_params) == ("latents" in terms)
    assert ("dskd" in loss_params) == ("dskd" in terms)
    params = {}
    for accum in (1, 2):
        setup.cfg = dataclasses.replace(
            cfg, optimizer=dataclasses.replace(cfg.optimizer, grad_accum=accum))
        step = jax.jit(setup.train_step(opt, None))
        state, metrics = step(init_state(student.params, opt, loss_params=loss_params),
                              teacher.params, batch)
        params[accum] = state.params
        assert np.isfinite(float(metrics["distill/loss"]))
    for a, b in zip(jax.tree.leaves(params[1]), jax.tree.leaves(params[2])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6)


def test_alm_from_cache_equals_live_teacher(tmp_path):
    """The cache holds, per teacher token, the actual token's log-prob and the word-boundary
    log-mass (fp32): training ALM from it reproduces the live teacher's loss curve."""
    from distill_jax.train.assemble import build_run_cache
    common = ["data.seq_len=512", "data.teacher_seq_len=384", "data.max_records=32", "steps=4",
              "cache.logprob_encoding=f32"]
    cache_dir = tmp_path / "cache"
    build_run_cache(_cfg(tmp_path / "build", *common, f"teacher.cache={cache_dir}"))
    run(_cfg(tmp_path / "live", *common))
    run(_cfg(tmp_path / "cached", *common, f"teacher.cache={cache_dir}"))
    live, cached = _metrics(tmp_path / "live"), _metrics(tmp_path / "cached")
    assert len(live) == len(cached) == 4
    for a, b in zip(live, cached):
        assert a["distill/alm_chunks"] == b["distill/alm_chunks"]
        assert abs(a["distill/alm"] - b["distill/alm"]) <= 1e-5, (a, b)
        assert abs(a["distill/loss"] - b["distill/loss"]) <= 1e-5, (a, b)


def test_same_vocabulary_terms_refused_across_tokenizers(tmp_path):
    with pytest.raises(ValueError, match="cross-tokenizer terms"):
        run(_cfg(tmp_path, "loss.terms={forward_kl: 1.0}"))


def test_cross_tokenizer_terms_cannot_mix_with_divergences():
    with pytest.raises(ValueError, match="not a cross-tokenizer term"):
        load_run_config(TINYX, ["loss.terms={alm: 1.0, forward_kl: 1.0}"]).loss.spec()


def test_xtok_batches_carry_alignment(tmp_path):
    _, setup, _, _, batch = _one_batch_setup(tmp_path)
    assert set(setup.keys) <= set(batch)
    assert (batch["chunk_ids"] >= 0).any()
    kept = np.unique(batch["chunk_ids"][batch["chunk_ids"] >= 0])
    kept_t = np.unique(batch["teacher_chunk_ids"][batch["teacher_chunk_ids"] >= 0])
    assert set(kept.tolist()) == set(kept_t.tolist())


def test_gradmag_weights(tmp_path):
    cfg, setup, teacher, student, batch = _one_batch_setup(
        tmp_path, "loss.terms={alm: 1.0, sft: 0.5}", "loss.balance=gradmag")
    opt = optim.make_optimizer(cfg.optimizer, cfg.steps)
    _, metrics = jax.jit(setup.train_step(opt, None))(init_state(student.params, opt),
                                                      teacher.params, batch)
    w_alm, w_sft = float(metrics["distill/weight_alm"]), float(metrics["distill/weight_sft"])
    assert w_alm > 0 and w_sft > 0 and abs(w_alm + w_sft - 1.5) <= 1e-4
    # ALM's gradient at the last layer is much smaller than sft's, so GradMag lifts its weight.
    assert w_alm / w_sft > 1.0 / 0.5
    # GradMag balances same-vocabulary terms too (tests/test_engine_terms.py checks it).
    assert load_run_config(REPO / "configs" / "tiny.yaml",
                           ["loss.balance=gradmag"]).loss.spec().balance == "gradmag"


@pytest.mark.parametrize("case", ["alm_sft", "latents_dskd"])
def test_xtok_step_gradient_equals_autodiff_of_the_objective(tmp_path, case):
    """The step's hand-assembled backward (trunk vjp after per-term vjps, loss modules in the
    head region) is the gradient of the weighted objective: one SGD step with lr 1 moves every
    param (model, alm_latents projector, DSKD projectors) by exactly -grad. Cases: alm + sft;
    alm + alm_latents through a projector + dskd (student width 16, teacher 32)."""
    import jax.numpy as jnp
    import optax
    from distill_jax.losses import terms, xtok
    from distill_jax.models import Model, hidden_states, lm_head
    from distill_jax.train.step import make_step, teacher_token_stats
    over = (["loss.terms={alm: 1.0, sft: 0.3}"] if case == "alm_sft" else
            ["loss.terms={alm: 1.0, alm_latents: 2.0, dskd: 0.5}", NARROW, "data.batch_size=4",
             "data.seq_len=128", "data.teacher_seq_len=64"])
    cfg, setup, teacher, student, batch = _one_batch_setup(tmp_path, *over)
    loss_params = init_loss_params(setup.spec, student.config, teacher.config, student.params)
    sgd = optax.sgd(1.0)
    step = jax.jit(make_step(student.config, teacher.config, setup.spec, terms.LIVE_ALIGNED,
                             sgd, chunk_size=64, **setup.xtok_args))
    state0 = init_state(student.params, sgd, loss_params=loss_params)
    params0 = state0.params
    state, metrics = step(state0, teacher.params, batch)

    stats = jax.jit(lambda tp, b: teacher_token_stats(
        teacher.config, tp, b, jnp.asarray(setup.xtok_args["teacher_word_start"]), chunk_size=64,
        keep_hidden=True))(teacher.params, batch)
    full = dict(batch, **stats)
    ids, t_ids = xtok.trained_chunks(full["chunk_ids"], full["teacher_chunk_ids"], full["loss_mask"])
    full["chunk_ids"], full["teacher_chunk_ids"] = ids, t_ids
    norms = terms.counts(setup.spec, full)
    teacher_model = Model(teacher.config, teacher.params)

    def objective(params):
        model_p = params[MODEL]
        m = Model(student.config, model_p)
        h = hidden_states(m, full["tokens"], positions=full["positions"],
                          segment_ids=full["segment_ids"])
        sums = terms.term_sums(terms.HeadInputs(
            setup.spec, full, student_h=h, student_head=lm_head(m),
            student_word_start=jnp.asarray(setup.xtok_args["student_word_start"]),
            chunk_size=64, params=params[LOSS], teacher_head=lm_head(teacher_model),
            student_embed=model_p["embed"], teacher_embed=teacher.params["embed"]))
        return terms.objective(setup.spec, sums, norms)

    value, grads = jax.jit(jax.value_and_grad(objective))(params0)
    assert abs(float(value) - float(metrics["distill/loss"])) <= 1e-5
    if case == "latents_dskd":
        assert params0[LOSS]["alm_latents"]["kernel"].shape == (16, 32)
        assert float(metrics["distill/alm_latents"]) > 0 and float(metrics["distill/dskd"]) > 0
        for name, leaf in jax.tree_util.tree_leaves_with_path(grads[LOSS]):
            assert float(jnp.max(jnp.abs(leaf))) > 0, name
    for p0, p1, g in zip(jax.tree.leaves(params0), jax.tree.leaves(state.params),
                         jax.tree.leaves(grads)):
        np.testing.assert_allclose(np.asarray(p0) - np.asarray(p1), np.asarray(g), atol=1e-6)


def test_alm_latents_run_resumes_exactly_and_exports_without_projector(tmp_path):
    """A run with an alm_latents projector: the projector is trained and checkpointed (an
    interrupted run resumes to the same metrics), and export/eval see only the model."""
    from distill_jax import checkpoint
    from distill_jax.export import export_run, load_student
    over = ["loss.terms={alm: 1.0, alm_latents: 1.0, sft: 0.1}", NARROW, "data.batch_size=4",
            "eval.every=3", "eval.batches=1", HELDOUT]
    run(_cfg(tmp_path / "straight", *over))
    run(_cfg(tmp_path / "resumed", *over), max_steps_this_call=3)
    run(_cfg(tmp_path / "resumed", *over))
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in a] == list(range(1, 7))
    assert [r["distill/loss"] for r in a] == [r["distill/loss"] for r in b[-6:]]
    assert a[-1]["distill/alm_latents"] < a[0]["distill/alm_latents"]
    evals = [r for r in a if "eval/alm_latents" in r]
    assert [r["step"] for r in evals] == [3, 6]
    assert evals[1]["eval/alm_latents"] < evals[0]["eval/alm_latents"]
    state = checkpoint.load_state_dict(tmp_path / "straight" / "checkpoints")
    assert state["params"][LOSS]["alm_latents"]["kernel"].shape == (16, 32)
    model, _ = load_student(tmp_path / "straight")
    assert set(model.params) == set(state["params"][MODEL]) and model.config.hidden_size == 16
    out = export_run(tmp_path / "straight", tmp_path / "export")
    assert (out / "config.json").exists()
    assert "latents" not in (out / "config.json").read_text()


def test_dskd_run_trains_its_projectors_and_exports_without_them(tmp_path):
    """sft + dskd in a run: DSKD's projectors are created, trained and checkpointed with the
    student, the held-out eval reports the term, and export drops the projectors."""
    import jax.numpy as jnp
    from distill_jax import checkpoint
    from distill_jax.export import load_student
    from distill_jax.losses import dskd
    run(_cfg(tmp_path, "loss.terms={sft: 1.0, dskd: 1.0}", NARROW, "data.batch_size=4",
             "steps=4", "eval.every=4", "eval.batches=1", HELDOUT))
    rows = _metrics(tmp_path)
    assert rows[-1]["distill/dskd_student_tokens"] > 0 and rows[-1]["distill/dskd_teacher_tokens"] > 0
    assert np.isfinite(rows[-1]["eval/dskd"]) and rows[-1]["eval/dskd"] > 0
    trained = checkpoint.load_state_dict(tmp_path / "checkpoints")["params"][LOSS]["dskd"]
    fresh = dskd.init_dskd_params(jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0x1A7E), 1),
                                  16, 32)
    for name, shape in (("query", (32, 64)), ("t2s", (32, 16)), ("s2t", (16, 32))):
        assert trained[name].shape == shape
        assert 1e-4 < float(jnp.max(jnp.abs(trained[name] - fresh[name]))) < 0.05  # 4 small steps
    model, _ = load_student(tmp_path)
    assert "dskd" not in model.params and "embed" in model.params


@pytest.mark.parametrize("term", ["alm_latents", "dskd"])
def test_hidden_state_terms_refused_with_a_cache(tmp_path, term):
    with pytest.raises(ValueError, match=f"{term} needs the teacher's hidden states"):
        run(_cfg(tmp_path / "a", f"loss.terms={{alm: 1.0, {term}: 1.0}}",
                 f"teacher.cache={tmp_path / 'no_cache'}"))


def test_alm_latents_refusals(tmp_path):
    with pytest.raises(ValueError, match="needs a projector"):
        run(_cfg(tmp_path / "b", "loss.terms={alm_latents: 1.0}", NARROW,
                 "loss.latents_projector=false"))


def test_loss_modules_shard_like_one_device(tmp_path):
    """alm + alm_latents (projector) + dskd on a (data 4, fsdp 2) mesh of 8 devices follow the
    one-device run step for step: the loss modules' params are replicated, the batch sharded."""
    over = ["loss.terms={alm: 1.0, alm_latents: 0.5, dskd: 0.5}", NARROW, "data.batch_size=8",
            "steps=2", "data.seq_len=128", "data.teacher_seq_len=64"]
    run(_cfg(tmp_path / "one", *over))
    run(_cfg(tmp_path / "mesh", *over, "mesh.num_devices=null", "mesh.data=4", "mesh.fsdp=2"))
    one, mesh = _metrics(tmp_path / "one"), _metrics(tmp_path / "mesh")
    assert len(one) == len(mesh) == 2
    for a, b in zip(one, mesh):
        for key in ("distill/loss", "distill/alm", "distill/alm_latents", "distill/dskd"):
            assert b[key] == pytest.approx(a[key], rel=2e-5, abs=1e-6), (key, a[key], b[key])
