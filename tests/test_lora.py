"""LoRA students: adapters in the model, training only them, checkpoints, and the two exports
(merged Hugging Face directory, PEFT adapter directory) checked against transformers and peft
(PyTorch, fp32)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from distill_jax import models as M
from distill_jax.models import lora
from distill_jax.models.config import ConfigError, LoraSpec

REPO = Path(__file__).resolve().parents[1]


def _adapted(family="llama", spec=LoraSpec(rank=4, alpha=8.0), seed=0, **overrides):
    """A tiny random base and the same with random (non-zero) adapters."""
    cfg = M.ModelConfig.tiny(family, **overrides)
    base = M.Model(cfg, jax.tree.map(jnp.asarray, M.numpy_params(cfg, np.random.default_rng(seed),
                                                                   0.05)))
    model = lora.add_adapters(base, spec, seed)
    rng = np.random.default_rng(seed + 1)
    params = jax.tree_util.tree_map_with_path(  # B is zero at init: give it values
        lambda p, x: jnp.asarray(rng.normal(0, 0.05, x.shape), x.dtype)
        if p[-1].key.endswith("_lora_b") else x, model.params)
    return base, model.replace(params=params)


def _tokens(vocab, shape=(2, 12), seed=3):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def _torch_logits(hm, tokens):
    with torch.no_grad():
        return hm(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


# ----------------------------------------------------------------------------- the model
def test_fresh_adapters_leave_the_model_unchanged_and_split_join_round_trip():
    cfg = M.ModelConfig.tiny()
    base = M.init(cfg, 0)
    model = lora.add_adapters(base, LoraSpec(rank=2, alpha=4.0, targets=("q", "down")), 1)
    tokens = _tokens(cfg.vocab_size)
    np.testing.assert_array_equal(np.asarray(M.forward(base, tokens)),
                                  np.asarray(M.forward(model, tokens)))
    b, a = lora.split(model.params)
    assert jax.tree.structure(b) == jax.tree.structure(base.params)
    assert sorted(a["layers"]["attn"]) == ["q_lora_a", "q_lora_b"]
    assert sorted(a["layers"]["mlp"]) == ["down_lora_a", "down_lora_b"]
    assert a["layers"]["attn"]["q_lora_a"].shape == (2, 64, 2)
    assert a["layers"]["mlp"]["down_lora_b"].shape == (2, 2, 64)
    assert jax.tree.structure(lora.join(b, a)) == jax.tree.structure(model.params)
    assert M.logical_axes(model.config)["layers"]["attn"]["q_lora_b"] == (
        "layers", "lora", "heads", "head_dim")


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_merged_export_matches_the_adapted_model_in_transformers(tmp_path, family):
    base, model = _adapted(family)
    tokens = _tokens(model.config.vocab_size)
    ours = np.asarray(M.forward(model, tokens))
    plain = np.asarray(M.forward(base, tokens))
    assert np.abs(ours - plain).max() > 1e-2  # the adapters matter
    merged = lora.merge(model)
    assert merged.config.lora is None
    M.save_hf(merged, tmp_path / "merged")
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                           dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(hm, tokens), ours, atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3_text"])
def test_peft_adapter_directory_loads_in_peft_and_matches(tmp_path, family):
    peft = pytest.importorskip("peft")
    base, model = _adapted(family, LoraSpec(rank=3, alpha=5.0, targets=("q", "v", "o", "up",
                                                                          "down")))
    tokens = _tokens(model.config.vocab_size)
    M.save_hf(base, tmp_path / "base")
    out = lora.save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 3 and cfg["lora_alpha"] == 5.0
    assert cfg["target_modules"] == ["down_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    hm = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                           dtype=torch.float32).eval()
    pm = peft.PeftModel.from_pretrained(hm, out).eval()
    loaded = {k for k, _ in pm.named_parameters() if "lora_" in k}
    assert len(loaded) == 2 * 5 * model.config.num_layers
    np.testing.assert_allclose(_torch_logits(pm, tokens), np.asarray(M.forward(model, tokens)),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("spec, message", [
    (dict(rank=0), "lora.rank=0: the adapter rank must be a positive integer"),
    (dict(alpha=0.0), "lora.alpha=0.0: the scale alpha/rank must be positive"),
    (dict(alpha=-2.0), "set lora.alpha > 0"),
    (dict(targets=("q_proj",)), "no projection 'q_proj' (did you mean 'q'?)"),
    (dict(targets=("qkv",)), "choose among ['q', 'k', 'v', 'o', 'gate', 'up', 'down']"),
    (dict(dropout=1.0), "lora.dropout=1.0: must lie in [0, 1)"),
])
def test_bad_lora_spec_is_one_line_naming_the_fix(spec, message):
    with pytest.raises(ConfigError) as e:
        LoraSpec(**spec)
    assert message in str(e.value) and "\n" not in str(e.value)


# ----------------------------------------------------------------------------- training
from distill_jax import checkpoint  # noqa: E402
from distill_jax.config import load_run_config  # noqa: E402
from distill_jax.train import optim  # noqa: E402
from distill_jax.train.assemble import assemble, build_run_cache, global_batch  # noqa: E402
from distill_jax.train.loop import run  # noqa: E402
from distill_jax.train.step import MODEL, STUDENT_BASE  # noqa: E402
from distill_jax import sharding  # noqa: E402

TINY = REPO / "configs" / "tiny.yaml"
LORA = ("student.lora.rank=2", "student.lora.alpha=4", "student.lora.dropout=0.1")
COMMON = ("logging.every=1", "logging.progress=false", "mesh.num_devices=1",
          "data.max_records=32", "data.batch_size=4", "checkpoint.every=2")


def _host(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def _assert_bitwise(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Every teacher signal, with terms of every kind it serves.
SIGNALS = {
    "live_same_vocabulary": ("tiny.yaml", ["loss.terms={forward_kl: 1.0, reverse_kl: 0.5, "
                                           "jsd: 0.5, tvd: 0.2, cross_entropy: 0.1}",
                                           "optimizer.grad_accum=2"]),
    "cached_topk": ("tiny.yaml", ["loss.terms={forward_kl: 1.0, pld: 0.5}", "cache.k=16"]),
    "live_cross_tokenizer": ("tiny_xtok.yaml", ["loss.terms={alm: 1.0, sft: 0.1, "
                                                "alm_latents: 0.5}"]),
    "onpolicy": ("onpolicy_tiny.yaml", ["onpolicy.lmbda=1.0", "onpolicy.max_new_tokens=8"]),
}


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_only_adapters_train_and_the_base_stays_bitwise(tmp_path, signal):
    name, extra = SIGNALS[signal]
    overrides = [f"run_dir={tmp_path / 'run'}", *COMMON, *LORA, *extra]
    if signal == "cached_topk":
        overrides.append(f"teacher.cache={tmp_path / 'cache'}")
        build_run_cache(load_run_config(REPO / "configs" / name, overrides))
    cfg = load_run_config(REPO / "configs" / name, overrides)
    run_ = assemble(cfg)
    optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
    state = run_.initial_state(optimizer)
    frozen = run_.teacher_params
    base_before = _host(frozen[STUDENT_BASE])
    adapters_before = _host(state.params[MODEL])
    # the state (so the gradients and the optimiser) holds the adapters and nothing else
    assert jax.tree.structure(state.params[MODEL]) == jax.tree.structure(
        lora.split(run_.student.params)[1])
    moments = [x for x in jax.tree.leaves(state.opt_state) if x.ndim > 0]
    assert sum(x.size for x in moments) == 2 * lora.num_adapter_params(run_.student.config) + sum(
        x.size for x in jax.tree.leaves(state.params["loss"])) * 2
    step = jax.jit(run_.train_step(optimizer, optim.make_schedule(cfg.optimizer, cfg.steps)))
    batches = run_.data_iterator()
    shard = sharding.batch_sharding(run_.mesh, 2, run_.rules)
    for _ in range(2):
        state, metrics = step(state, frozen, global_batch(next(batches), shard, run_.batch_keys))
        assert np.isfinite(float(metrics["distill/loss"]))
    batches.close()
    _assert_bitwise(base_before, _host(frozen[STUDENT_BASE]))
    moved = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
        jax.tree.leaves(adapters_before), jax.tree.leaves(state.params[MODEL]))]
    assert all(moved), "every adapter (A and B) receives gradient"


def _hf_base(tmp_path) -> Path:
    """A tiny llama HF directory the LoRA student starts from (the run's vocabulary)."""
    cfg = M.ModelConfig.tiny(vocab_size=259, num_layers=2, hidden_size=32, intermediate_size=64,
                             num_heads=2, num_kv_heads=1)
    base = M.Model(cfg, jax.tree.map(jnp.asarray, M.numpy_params(
        cfg, np.random.default_rng(5), 0.05)))
    return M.save_hf(base, tmp_path / "base")


def _hf_run(tmp_path, run_dir, *extra):
    return load_run_config(TINY, [f"run_dir={run_dir}", *COMMON, *LORA, "steps=4",
                                  "student.init=hf", f"student.hf_path={tmp_path / 'base'}",
                                  "student.preset=null", "student.overrides={}", *extra])


def test_interrupted_and_resumed_equals_straight_and_a_new_base_is_refused(tmp_path):
    _hf_base(tmp_path)
    run(_hf_run(tmp_path, tmp_path / "straight"))
    run(_hf_run(tmp_path, tmp_path / "resumed"), max_steps_this_call=2)
    assert checkpoint.latest_step(tmp_path / "resumed" / "checkpoints") == 2
    run(_hf_run(tmp_path, tmp_path / "resumed"))
    straight = checkpoint.load_state_dict(tmp_path / "straight" / "checkpoints", 4)
    resumed = checkpoint.load_state_dict(tmp_path / "resumed" / "checkpoints", 4)
    _assert_bitwise(straight, resumed)  # adapters, optimiser state, step and RNG (dropout)
    # checkpoints hold the adapters only, and the base's fingerprint
    assert all(k.endswith(lora.SUFFIXES) for p in jax.tree_util.tree_flatten_with_path(
        straight["params"][MODEL])[0] for k in [p[0][-1].key])
    assert checkpoint.saved_base_fingerprint(tmp_path / "straight" / "checkpoints", 4)
    # the same base directory with other weights: resuming is refused, nothing is moved
    other = M.load_hf(tmp_path / "base")
    other = other.replace(params={**other.params, "embed": other.params["embed"] * 1.5})
    M.save_hf(other, tmp_path / "base", overwrite=True)
    with pytest.raises(checkpoint.BaseMismatchError) as e:
        run(_hf_run(tmp_path, tmp_path / "resumed", "steps=6"))
    message = str(e.value)
    assert "trained on another base model" in message and "\n" not in message
    assert checkpoint.latest_step(tmp_path / "resumed" / "checkpoints") == 4
    assert not (tmp_path / "resumed" / "checkpoints_damaged").exists()


def test_optimizer_state_is_the_adapters_only_and_smaller(tmp_path):
    """... and the first step's loss is the whole student's (B = 0: the adapted student starts
    as its base, adapter dropout or not)."""
    sizes, losses = {}, {}
    for name, extra in (("full", []), ("lora", list(LORA))):
        cfg = load_run_config(TINY, [f"run_dir={tmp_path / name}", *COMMON, *extra])
        run_ = assemble(cfg)
        optimizer = optim.make_optimizer(cfg.optimizer, cfg.steps)
        state = run_.initial_state(optimizer)
        sizes[name] = sum(x.nbytes for x in jax.tree.leaves(state.opt_state))
        batches = run_.data_iterator()
        batch = global_batch(next(batches), sharding.batch_sharding(run_.mesh, 2, run_.rules),
                             run_.batch_keys)
        batches.close()
        step = jax.jit(run_.train_step(optimizer, optim.make_schedule(cfg.optimizer, cfg.steps)))
        losses[name] = float(step(state, run_.teacher_params, batch)[1]["distill/loss"])
    assert losses["lora"] == pytest.approx(losses["full"], rel=1e-6, abs=0)
    student = M.ModelConfig.tiny(vocab_size=259, num_layers=1, hidden_size=32,
                                 intermediate_size=64, num_heads=2, num_kv_heads=1)
    full_params = student.num_params()
    lora_params = lora.num_adapter_params(student.replace(lora=LoraSpec(rank=2, alpha=4.0)))
    assert sizes["full"] >= 2 * 4 * full_params  # Adam's two moments, fp32
    assert sizes["lora"] < 2 * 4 * lora_params + 64  # the moments, plus counters
    assert sizes["lora"] * 10 < sizes["full"]


def test_export_cli_merged_and_peft_adapter_match_the_trained_student(tmp_path):
    peft = pytest.importorskip("peft")
    from distill_jax import cli
    from distill_jax.export import load_student
    _hf_base(tmp_path)
    run_dir = tmp_path / "run"
    run(_hf_run(tmp_path, run_dir, "eval.every=2", "eval.batches=1"))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval/loss" in r] == [2, 4]  # held-out loss, adapted
    student, _ = load_student(run_dir)
    assert student.config.lora is not None
    tokens = _tokens(259, (2, 10))
    ours = np.asarray(M.forward(student, tokens))
    assert cli.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    assert cli.main(["export", str(run_dir), str(tmp_path / "adapter"), "--lora", "adapter"]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(merged, tokens), ours, atol=1e-4, rtol=0)
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                             dtype=torch.float32).eval()
    adapted = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    np.testing.assert_allclose(_torch_logits(adapted, tokens), ours, atol=1e-4, rtol=0)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((tmp_path / "base").absolute())
    # untargeted weights are the base's, bit for bit
    from distill_jax.models.hf import SafetensorsDir
    a, b = SafetensorsDir(tmp_path / "merged"), SafetensorsDir(tmp_path / "base")
    for key in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        np.testing.assert_array_equal(np.asarray(a.array(key)), np.asarray(b.array(key)))


def test_lora_on_an_int8_base_trains_and_exports_the_trained_model(tmp_path):
    """``student.quantize: int8`` with LoRA: the frozen base holds int8 weights (a quarter of
    the fp32 base's bytes), the adapters train, and the merged export (the int8 base read back,
    plus the adapters) matches the trained student in transformers."""
    from distill_jax import cli
    from distill_jax.export import load_student
    from distill_jax.models import quant
    _hf_base(tmp_path)
    run_dir = tmp_path / "run"
    cfg = _hf_run(tmp_path, run_dir, "student.quantize=int8")
    run_ = assemble(cfg)
    base = run_.teacher_params[STUDENT_BASE]
    assert quant.is_quantized(base)
    full = assemble(_hf_run(tmp_path, tmp_path / "full")).teacher_params[STUDENT_BASE]
    assert quant.param_bytes(base) < 0.4 * quant.param_bytes(full)
    last = run(cfg)
    assert np.isfinite(last["distill/loss"])
    student, _ = load_student(run_dir)
    assert quant.is_quantized(lora.split(student.params)[0])
    tokens = _tokens(259, (2, 10))
    ours = np.asarray(M.forward(student, tokens))
    assert cli.main(["export", str(run_dir), str(tmp_path / "merged")]) == 0
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                               dtype=torch.float32).eval()
    np.testing.assert_allclose(_torch_logits(merged, tokens), ours, atol=1e-4, rtol=0)


def test_bad_lora_config_and_adapter_export_of_a_whole_student_are_one_line(tmp_path, capsys):
    from distill_jax import cli
    for override, message in (("student.lora.rank=0", "lora.rank=0"),
                              ("student.lora.targets=[qkv]", "no projection 'qkv'"),
                              ("student.lora.alpha=-1", "set lora.alpha > 0")):
        code = cli.main(["train", str(TINY), f"run_dir={tmp_path / 'bad'}", override])
        err = capsys.readouterr().err.strip()
        assert code == 2 and message in err and len(err.splitlines()) == 1, err
    run_dir = tmp_path / "whole"
    run(load_run_config(TINY, [f"run_dir={run_dir}", *COMMON, "steps=1"]))
    capsys.readouterr()
    code = cli.main(["export", str(run_dir), str(tmp_path / "out"), "--lora", "adapter"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not LoRA adapters" in err and len(err.splitlines()) == 1, err


def test_dropout_is_on_the_adapter_input_only_and_off_in_evaluation():
    _, model = _adapted(spec=LoraSpec(rank=4, alpha=8.0, dropout=0.5))
    no_dropout = model.replace(config=model.config.replace(
        lora=LoraSpec(rank=4, alpha=8.0, dropout=0.0)))
    tokens = _tokens(model.config.vocab_size)
    keys = jax.random.key_data(jax.random.split(jax.random.key(0), tokens.shape[0]))
    h_eval = np.asarray(M.hidden_states(model, tokens))
    np.testing.assert_array_equal(h_eval, np.asarray(M.hidden_states(no_dropout, tokens)))
    h_train = np.asarray(M.hidden_states(model, tokens, lora_keys=keys))
    assert np.abs(h_train - h_eval).max() > 1e-3
    # rows draw their own masks: a row's output depends on its own key only
    h_row = np.asarray(M.hidden_states(model, tokens[1:], lora_keys=keys[1:]))
    np.testing.assert_allclose(h_row, h_train[1:], atol=1e-6, rtol=0)
    # with B = 0 the adapters add nothing, dropout or not: the base path is never dropped
    zero_b = model.replace(params=jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if p[-1].key.endswith("_lora_b") else x, model.params))
    plain = M.Model(model.config.replace(lora=None), lora.split(model.params)[0])
    np.testing.assert_array_equal(np.asarray(M.hidden_states(zero_b, tokens, lora_keys=keys)),
                                  np.asarray(M.hidden_states(plain, tokens)))


def test_adapters_follow_the_sharding_rules_and_sharded_equals_unsharded(devices8):
    from distill_jax.sharding import make_mesh
    base, model = _adapted()
    mesh = make_mesh(2, 2, 2, devices8)
    placed = lora.add_adapters(M.Model(base.config, jax.device_put(
        base.params, M.param_shardings(base.config, mesh))), model.config.lora, mesh=mesh)
    specs = jax.tree.map(lambda x: tuple(x.sharding.spec), lora.split(placed.params)[1])
    assert specs["layers"]["attn"]["q_lora_b"] == (None, None, "tensor", None)  # heads
    assert specs["layers"]["attn"]["q_lora_a"] == (None, "fsdp", None)  # embed
    assert specs["layers"]["mlp"]["down_lora_a"] == (None, "tensor", None)  # mlp
    sharded = placed.replace(params=jax.device_put(model.params,
                                                   M.param_shardings(model.config, mesh)))
    tokens = _tokens(model.config.vocab_size, (4, 12))
    np.testing.assert_allclose(np.asarray(jax.jit(M.forward)(sharded, tokens)),
                               np.asarray(M.forward(model, tokens)), atol=1e-5, rtol=0)
