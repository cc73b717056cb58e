"""Int8 weight-only teachers: per-channel quantisation against a float64 numpy reference,
the quantised model's forward, sharding, memory, and the config path (live teacher and cache)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import configlib, sharding
from distill_jax import models as M
from distill_jax.config import load_run_config
from distill_jax.models import quant

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _reference(w: np.ndarray, contracted: tuple[int, ...]):
    """float64 per-channel int8: scale = max|w| / 127 over the contracted axes (1 for a zero
    channel), q = round-half-even(w / scale) clipped to +-127."""
    w = np.asarray(w, np.float64)
    amax = np.max(np.abs(w), axis=contracted, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0)
    q = np.clip(np.round(w / scale), -127, 127)
    return q, scale


def test_per_channel_scales_and_zero_channels_match_float64_reference():
    rng = np.random.default_rng(0)
    # (embed=6, heads=3, head_dim=4), contracted over embed: one scale per (head, head_dim).
    w = rng.normal(0, 1, (6, 3, 4)).astype(np.float32)
    w[:, 1, 2] = 0.0  # a planted all-zero output channel
    w[:, 0, 0] *= 1000.0  # a channel 1000x larger: per-channel scales keep the others precise
    qa = quant.quantize_array(jnp.asarray(w), (0,))
    q_ref, s_ref = _reference(w, (0,))
    assert qa.q.dtype == jnp.int8 and qa.scale.shape == (1, 3, 4)
    np.testing.assert_allclose(np.asarray(qa.scale, np.float64), s_ref, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(qa.q, np.int64), q_ref.astype(np.int64))
    assert np.all(np.asarray(qa.q)[:, 1, 2] == 0) and float(qa.scale[0, 1, 2]) == 1.0
    back = np.asarray(qa[...], np.float64)
    assert np.all(np.isfinite(back)) and np.all(back[:, 1, 2] == 0.0)
    # Every element is within half a step of its own channel's scale.
    assert np.all(np.abs(back - w) <= 0.5 * s_ref * (1 + 1e-5))
    # The max-abs element of each channel is represented exactly (up to fp32 rounding).
    small = np.delete(w.reshape(6, 12), [0, 6], axis=1)  # channels other than (0,0) and (1,2)
    err = np.abs(np.delete(back.reshape(6, 12), [0, 6], axis=1) - small)
    assert err.max() < 0.05  # a per-tensor scale would give errors of ~1000/127/2 here


def _tiny_llama():
    return M.ModelConfig.tiny("llama", num_layers=2)


def test_quantized_forward_equals_the_dequantized_weights_model():
    """The int8 model's logits equal those of a float model holding q * scale (computed in
    float64 here), and are close to the original's."""
    cfg = _tiny_llama()
    model = M.init(cfg, 0)
    qmodel = quant.quantize(model)
    assert quant.is_quantized(qmodel) and not quant.is_quantized(model)
    kinds = {k for k, v in jax.tree_util.tree_flatten_with_path(
        qmodel.params, is_leaf=quant.is_qarray)[0] if isinstance(v, quant.QArray)
             for k in [str(k[-1])]}
    assert {"['q']", "['k']", "['v']", "['o']", "['gate']", "['up']", "['down']",
            "['embed']"} <= kinds
    ref = jax.tree.map(
        lambda x: (np.asarray(x.q, np.float64) * np.asarray(x.scale, np.float64)).astype(np.float32)
        if isinstance(x, quant.QArray) else np.asarray(x), qmodel.params, is_leaf=quant.is_qarray)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 12)), jnp.int32)
    got = np.asarray(jax.jit(M.forward)(qmodel, tokens))
    want = np.asarray(jax.jit(M.forward)(M.Model(cfg, ref), tokens))
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    orig = np.asarray(jax.jit(M.forward)(model, tokens))
    assert 0 < np.abs(got - orig).max() < 0.05 * np.abs(orig).max()
    # Dequantising gives back the same float model.
    deq = quant.dequantize(qmodel)
    assert not quant.is_quantized(deq)
    np.testing.assert_allclose(np.asarray(jax.jit(M.forward)(deq, tokens)), want, atol=1e-5)


def test_int8_memory_is_half_of_bf16_and_a_quarter_of_fp32():
    cfg = M.ModelConfig.tiny("llama", num_layers=2, hidden_size=128, intermediate_size=256,
                             vocab_size=512)
    model = M.init(cfg, 0)
    fp32 = quant.param_bytes(model)
    bf16 = quant.param_bytes(M.cast_params(model, jnp.bfloat16))
    int8 = quant.param_bytes(quant.quantize(model))
    assert int8 <= 0.52 * bf16 and int8 <= 0.26 * fp32, (fp32, bf16, int8)


def test_quantized_model_keeps_shardings_on_a_mesh(devices8):
    """On an (fsdp 4, tensor 2) mesh the int8 values keep the weight's sharding and the scales
    are replicated on their size-1 axes; the sharded logits equal the unsharded ones."""
    cfg = _tiny_llama()
    mesh = sharding.make_mesh(1, 4, 2, devices8)
    model = M.init(cfg, 0, mesh=mesh)
    qmodel = quant.quantize(model, mesh=mesh)
    q = qmodel.params["layers"]["attn"]["q"]
    w_spec = model.params["layers"]["attn"]["q"].sharding.spec
    assert q.q.sharding.spec == w_spec
    assert all(s is None for s, n in zip(tuple(q.scale.sharding.spec) + (None,) * 4, q.scale.shape)
               if n == 1)
    tokens = jnp.asarray(np.arange(24).reshape(2, 12) % cfg.vocab_size, jnp.int32)
    single = quant.quantize(M.init(cfg, 0))
    np.testing.assert_allclose(np.asarray(jax.jit(M.forward)(qmodel, tokens)),
                               np.asarray(jax.jit(M.forward)(single, tokens)), atol=1e-5)


def _tiny(tmp_path: Path, *overrides: str):
    return load_run_config(TINY, [f"run_dir={tmp_path}", "logging.every=1", "steps=4",
                                  "checkpoint.every=4", "logging.progress=false",
                                  "data.max_records=32", *overrides])


def test_live_int8_teacher_trains_and_student_copies_full_precision_weights(tmp_path):
    from distill_jax.train.assemble import assemble
    from distill_jax.train.loop import run
    cfg = _tiny(tmp_path / "a", "teacher.quantize=int8", "student.init=teacher_layers",
                "student.layers=[1]", "student.overrides={}")
    assembled = assemble(cfg)
    assert quant.is_quantized(assembled.teacher.params)
    assert not quant.is_quantized(assembled.student.params)
    full = M.init(assembled.teacher.config, cfg.teacher.seed)
    np.testing.assert_array_equal(np.asarray(assembled.student.params["layers"]["mlp"]["up"][0]),
                                  np.asarray(full.params["layers"]["mlp"]["up"][1]))
    last = run(cfg)
    assert np.isfinite(last["distill/loss"])


def test_cache_built_by_int8_teacher_records_it_and_is_refused_by_a_full_precision_run(tmp_path):
    from distill_jax.cache.store import CacheMismatchError
    from distill_jax.train.assemble import build_run_cache
    from distill_jax.train.loop import run
    cache_dir = tmp_path / "cache"
    common = ["data.seq_len=128", "cache.k=16", f"teacher.cache={cache_dir}"]
    build_run_cache(_tiny(tmp_path / "build", *common, "teacher.quantize=int8"))
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["teacher"]["quantize"] == "int8"
    run(_tiny(tmp_path / "ok", *common, "teacher.quantize=int8"))
    with pytest.raises(CacheMismatchError, match="quantize"):
        run(_tiny(tmp_path / "other", *common))


def test_bad_quantize_settings_are_refused_with_the_fix(tmp_path):
    with pytest.raises(configlib.ConfigKeyError, match="student.quantize.*teacher.quantize"):
        _tiny(tmp_path, "student.quantize=int8")
    with pytest.raises(configlib.ConfigKeyError, match="int4"):
        _tiny(tmp_path, "teacher.quantize=int4")
    with pytest.raises(ValueError, match="unknown quantize mode"):
        quant.quantize(M.init(_tiny_llama(), 0), "int4")
