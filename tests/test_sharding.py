"""Sharding on 8 fake CPU devices: meshes, the logical-axis table, sharded init, sharded
forward equal to single-device forward, sharded HF loading that reads only each device's
slice, and full-size presets checked abstractly (nothing allocated)."""

from __future__ import annotations

import math
import re
import resource

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from distill_jax import sharding as shd
from distill_jax.models import (
    CheckpointError, Model, ModelConfig, RopeScaling, forward, init, load_hf, param_shapes,
    param_shardings, save_hf,
)
from distill_jax.models.hf import SafetensorsDir, write_safetensors

SEED = 3
_HLO_SHAPE = re.compile(r"\b(?:pred|bf16|[sufc]\d+)\[([\d,]*)\]")  # dims of e.g. f32[2,32]{1,0}
BATCH, LENGTH = 8, 24
# fp32 with matmul precision "highest" (conftest): sharded == unsharded up to rounding. Seen:
# <= 5e-7 on logits of magnitude ~1; one device alone differs by 2.4e-7 between a batch of 8
# and the same rows one at a time (XLA picks other summation orders), so that is the floor.
ATOL = 1e-5

# Tiny configs whose dims every mesh below divides (except llama's 2 kv heads on tensor=4,
# which must then stay replicated). gemma2 brings sliding windows (8 < LENGTH) and softcaps.
FORWARD_CONFIGS = {
    "llama": ModelConfig.tiny("llama", num_heads=4, num_kv_heads=2, hidden_size=64,
                              intermediate_size=128, vocab_size=256),
    "gemma2": ModelConfig.tiny("gemma2", num_heads=4, num_kv_heads=4, hidden_size=64,
                               intermediate_size=128, vocab_size=256, query_pre_attn_scalar=16),
}
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4), (2, 4, 1), (4, 1, 2)]


def _mesh_id(shape) -> str:
    return "data{}-fsdp{}-tensor{}".format(*shape)


def _fwd(model: Model, tokens, segment_ids):
    return forward(model, tokens, segment_ids=segment_ids)


def _leaves_with_paths(tree):
    return [(jax.tree_util.keystr(p), x) for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def _sharded_forward(model: Model, batch: dict[str, np.ndarray], mesh) -> jax.Array:
    """``forward`` jitted with explicit in/out shardings on ``mesh``, inputs placed sharded."""
    bs = shd.batch_sharding(mesh)
    fwd = jax.jit(_fwd, in_shardings=(Model(model.config, param_shardings(model.config, mesh)), bs, bs),
                  out_shardings=shd.batch_sharding(mesh, 3))
    logits = fwd(model, jax.device_put(batch["tokens"], bs), jax.device_put(batch["segment_ids"], bs))
    assert logits.sharding.spec == shd.batch_sharding(mesh, 3).spec
    return logits


# ----------------------------------------------------------------------------- meshes
@pytest.mark.parametrize("sizes, expected", [
    ((-1, 1, 1), (8, 1, 1)),
    ((1, -1, 1), (1, 8, 1)),
    ((2, -1, 2), (2, 2, 2)),
    ((1, 2, -1), (1, 2, 4)),
    ((4, 1, 2), (4, 1, 2)),
])
def test_mesh_shape_resolves_minus_one(sizes, expected):
    assert shd.mesh_shape(8, *sizes) == expected


@pytest.mark.parametrize("sizes, fragments", [
    ((-1, 3, 1), ["fsdp=3", "8"]),                # 3 does not divide 8
    ((2, 2, 1), ["data=2", "fsdp=2", "= 4", "8"]),  # 4 != 8, no -1 to take the rest
    ((4, 4, 1), ["= 16", "8"]),
    ((-1, -1, 2), ["at most one", "data=-1", "fsdp=-1"]),
    ((-1, 0, 1), ["fsdp=0", "positive"]),
    ((-1, -2, 1), ["fsdp=-2", "positive"]),
])
def test_mesh_shape_rejects_impossible_shapes(sizes, fragments):
    with pytest.raises(ValueError) as err:
        shd.mesh_shape(8, *sizes)
    for fragment in fragments:
        assert fragment in str(err.value), (fragment, str(err.value))


def test_make_mesh(devices8):
    mesh = shd.make_mesh(2, -1, 2, devices=devices8)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == AxisType.Auto for t in mesh.axis_types)
    assert set(mesh.devices.flat) == set(devices8)
    assert dict(shd.make_mesh(devices=devices8).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert dict(shd.make_mesh(1, 1, -1, devices=devices8[:4]).shape) == {"data": 1, "fsdp": 1, "tensor": 4}
    with pytest.raises(ValueError, match="fsdp=3"):
        shd.make_mesh(-1, 3, 1, devices=devices8)


def test_logical_to_spec_rules():
    spec = shd.logical_to_spec
    assert spec(("batch", "length")) == P(("data", "fsdp"), None)
    assert spec(("layers", "embed", "heads", "head_dim")) == P(None, "fsdp", "tensor", None)
    assert spec(("layers", "heads", "head_dim", "embed")) == P(None, "tensor", None, "fsdp")
    assert spec(("vocab", "embed")) == P("tensor", "fsdp")
    assert spec(("embed", "vocab")) == P("fsdp", "tensor")
    assert spec((None, "mlp")) == P(None, "tensor")
    rules = {"rows": "fsdp", "cols": ("data", "tensor")}
    assert spec(("rows", "cols"), rules) == P("fsdp", ("data", "tensor"))


def test_logical_to_spec_never_uses_a_mesh_axis_twice(devices8):
    spec = shd.logical_to_spec
    assert spec(("vocab", "mlp")) == P("tensor", None)
    assert spec(("heads", "kv_heads", "mlp")) == P("tensor", None, None)
    assert spec(("batch", "embed")) == P(("data", "fsdp"), None)
    assert spec(("embed", "batch")) == P("fsdp", "data")
    mesh = shd.make_mesh(2, 2, 2, devices=devices8)
    for axes in [("batch", "embed", "heads", "kv_heads", "mlp", "vocab"),
                 ("vocab", "heads", "mlp", "embed", "batch"), ("embed", "embed", "embed")]:
        used = [a for entry in spec(axes, mesh=mesh) if entry is not None
                for a in ((entry,) if isinstance(entry, str) else entry)]
        assert len(used) == len(set(used)), (axes, used)


def test_logical_to_spec_with_mesh_and_shape(devices8):
    spec = shd.logical_to_spec
    mesh = shd.make_mesh(2, 2, 2, devices=devices8)
    # Divisible dims shard; a dim the mesh axes do not divide stays replicated.
    assert spec(("embed", "heads"), shape=(64, 4), mesh=mesh) == P("fsdp", "tensor")
    assert spec(("embed", "heads"), shape=(63, 3), mesh=mesh) == P(None, None)
    assert spec(("batch", "length"), shape=(6, 5), mesh=mesh) == P(None, None)  # 6 % (2*2)
    assert spec(("batch", "length"), shape=(12, 5), mesh=mesh) == P(("data", "fsdp"), None)
    # An axis left unused by a non-divisible dim is free for a later one.
    rules = {"a": "tensor", "b": "tensor"}
    assert spec(("a", "b"), rules, shape=(3, 4), mesh=mesh) == P(None, "tensor")
    assert spec(("a", "b"), rules, shape=(4, 4), mesh=mesh) == P("tensor", None)
    # Size-1 mesh axes are dropped from the spec.
    dp = shd.make_mesh(8, 1, 1, devices=devices8)
    assert spec(("batch", "embed", "heads"), mesh=dp) == P("data", None, None)
    assert shd.batch_sharding(mesh, 3).spec == P(("data", "fsdp"), None, None)
    assert shd.batch_sharding(dp).spec == P("data", None)
    with pytest.raises(ValueError, match="do not match the shape"):
        spec(("embed", "heads"), shape=(64,), mesh=mesh)
    with pytest.raises(ValueError, match="model"):
        spec(("embed",), {"embed": "model"}, mesh=mesh)


def test_logical_to_spec_unknown_axis_raises():
    with pytest.raises(KeyError, match="'hedas'"):
        shd.logical_to_spec(("embed", "hedas"))
    with pytest.raises(KeyError, match="embed"):
        shd.logical_to_spec(("embed",), rules={"heads": "tensor"})


# ----------------------------------------------------------------------------- sharded forward
@pytest.fixture(scope="module")
def single_device_reference(make_packed_batch):
    """family -> (cfg, batch, params as numpy, logits), all computed on one device."""
    cache: dict[str, tuple] = {}

    def get(family: str):
        if family not in cache:
            cfg = FORWARD_CONFIGS[family]
            batch = make_packed_batch(BATCH, LENGTH, cfg.vocab_size)
            model = init(cfg, SEED)
            assert all(len(x.devices()) == 1 for x in jax.tree.leaves(model))
            logits = jax.jit(_fwd)(model, batch["tokens"], batch["segment_ids"])
            assert len(logits.devices()) == 1
            cache[family] = (cfg, batch, jax.tree.map(np.asarray, model.params), np.asarray(logits))
        return cache[family]

    return get


@pytest.mark.parametrize("shape", MESHES, ids=_mesh_id)
@pytest.mark.parametrize("family", sorted(FORWARD_CONFIGS))
def test_sharded_forward_matches_single_device(devices8, single_device_reference, family, shape):
    cfg, batch, ref_params, ref_logits = single_device_reference(family)
    _, fsdp, tensor = shape
    mesh = shd.make_mesh(*shape, devices=devices8)
    model = init(cfg, SEED, mesh=mesh)

    # Created directly with the declared shardings, and the same numbers as on one device.
    expected = param_shardings(cfg, mesh)
    for (path, x), s in zip(_leaves_with_paths(model.params), jax.tree.leaves(expected)):
        assert x.sharding == s, (path, x.sharding, s)
    jax.tree.map(lambda x, r: np.testing.assert_array_equal(np.asarray(x), r), model.params, ref_params)

    # The params really are split: heads over tensor, embed over fsdp, smaller local shards.
    q = model.params["layers"]["attn"]["q"]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == P(None, "fsdp" if fsdp > 1 else None,
                                "tensor" if tensor > 1 else None, None)
    assert {s.data.shape for s in q.addressable_shards} == {
        (cfg.num_layers, cfg.hidden_size // fsdp, cfg.num_heads // tensor, cfg.head_dim)}
    k = model.params["layers"]["attn"]["k"]  # kv heads split only where tensor divides them
    kv_split = tensor if cfg.num_kv_heads % tensor == 0 else 1
    assert k.addressable_shards[0].data.shape[2] == cfg.num_kv_heads // kv_split
    matrices = [(path, x) for path, x in _leaves_with_paths(model.params) if x.ndim >= 2
                and "norm" not in path]
    for path, x in matrices:
        local = x.addressable_shards[0].data.size
        if fsdp * tensor == 1:  # pure data parallelism: every device holds everything
            assert x.sharding.is_fully_replicated and local == x.size, path
        else:  # every weight matrix is split
            assert local < x.size, (path, x.sharding.spec)

    logits = _sharded_forward(model, batch, mesh)
    diff = float(np.max(np.abs(np.asarray(logits) - ref_logits)))
    print(f"{family} mesh={shape}: max|sharded - single| = {diff:.3g} "
          f"(max|logit| {np.abs(ref_logits).max():.3g})")
    assert diff <= ATOL, diff


# ----------------------------------------------------------------------------- sharded init
def test_init_on_mesh_never_materialises_whole_params(devices8, monkeypatch):
    """init's jitted program, as compiled for the mesh (per device), holds no array larger
    than the largest parameter shard, and none of a sharded parameter's full shape: each
    device generates only its own slices (random bits included: with non-partitionable
    threefry the whole embedding's bits would show up as one u32 array)."""
    cfg = FORWARD_CONFIGS["llama"]
    mesh = shd.make_mesh(2, 2, 2, devices=devices8)
    jitted = []
    real_jit = jax.jit

    def spy_jit(fun, *args, **kwargs):
        out = real_jit(fun, *args, **kwargs)
        if "out_shardings" in kwargs:
            jitted.append(out)
        return out

    monkeypatch.setattr(jax, "jit", spy_jit)
    model = init(cfg, SEED, mesh=mesh)
    monkeypatch.setattr(jax, "jit", real_jit)
    assert len(jitted) == 1, "init should jit the param creation once, with out_shardings"

    expected = param_shardings(cfg, mesh)
    hlo = jitted[0].lower().compile().as_text()
    sharded = 0
    for (path, x), s in zip(_leaves_with_paths(model.params), jax.tree.leaves(expected)):
        assert x.sharding == s, (path, x.sharding, s)
        for shard in x.addressable_shards:
            assert shard.data.shape == s.shard_shape(x.shape), path
        if not s.is_fully_replicated:
            sharded += 1
            full = "f32[" + ",".join(map(str, x.shape)) + "]"
            assert full not in hlo, f"{path}: the compiled init builds a whole {full} on a device"
    assert sharded == len(jax.tree.leaves(model.params))  # on (2,2,2) every param is split
    largest_shard = max(math.prod(s.shard_shape(x.shape))
                        for x, s in zip(jax.tree.leaves(model.params), jax.tree.leaves(expected)))
    biggest = max(math.prod(int(d) for d in dims.split(",") if d)
                  for dims in _HLO_SHAPE.findall(hlo))
    assert biggest <= largest_shard, (
        f"the compiled init holds an array of {biggest} elements; the largest shard has "
        f"{largest_shard}")
    total = sum(x.nbytes for x in jax.tree.leaves(model.params))
    on_device0 = sum(sh.data.nbytes for x in jax.tree.leaves(model.params)
                     for sh in x.addressable_shards if sh.device == devices8[0])
    assert on_device0 <= total / 3, (on_device0, total)


# ----------------------------------------------------------------------------- sharded HF loading
def _random_params(cfg: ModelConfig, seed: int) -> dict:
    """Params with every entry random (biases and norm scales included), on device 0:
    weight matrices at a realistic scale, vectors (norms, biases) far from their init."""
    rng = np.random.default_rng(seed)

    def draw(path, s):
        name = jax.tree_util.keystr(path)
        std = 0.3 if ("scale" in name or "bias" in name) else 0.05
        return jnp.asarray(std * rng.standard_normal(s.shape), s.dtype)

    return jax.tree_util.tree_map_with_path(draw, param_shapes(cfg))


class _CountingTensor:
    """Stands in for a memory-mapped checkpoint tensor. Reshape, transpose and indexing stay
    views of the file; every element that becomes a real array (np.asarray, or an operation
    that had to copy) is counted, so a test sees exactly what a read materialises."""

    def __init__(self, base: np.ndarray, counter: list[int]):
        self._base, self._counter = base, counter

    def _wrap(self, out: np.ndarray) -> "_CountingTensor":
        if not np.may_share_memory(out, self._base):
            self._counter[0] += out.size  # the operation copied
        return _CountingTensor(out, self._counter)

    @property
    def shape(self) -> tuple[int, ...]:
        return self._base.shape

    @property
    def dtype(self):
        return self._base.dtype

    def reshape(self, *shape):
        return self._wrap(self._base.reshape(*shape))

    def transpose(self, *axes):
        return self._wrap(self._base.transpose(*axes))

    def __getitem__(self, index):
        return self._wrap(self._base[index])

    def __array__(self, dtype=None, copy=None):
        out = np.array(self._base, dtype=dtype, copy=True)
        self._counter[0] += out.size
        return out


HF_CONFIGS = {
    # Untied lm_head and every bias llama can carry; kv heads fewer than heads.
    "llama": ModelConfig.tiny("llama", num_kv_heads=2, qkv_bias=True, out_bias=True, mlp_bias=True),
    # Tied embeddings, sandwich norms, softcaps.
    "gemma2": FORWARD_CONFIGS["gemma2"],
}


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_checkpoint(request, tmp_path_factory):
    cfg = HF_CONFIGS[request.param]
    source = Model(cfg, _random_params(cfg, seed=11))
    path = save_hf(source, tmp_path_factory.mktemp(request.param) / "ckpt")
    return cfg, source, path


def test_load_hf_sharded(devices8, hf_checkpoint, make_packed_batch, monkeypatch):
    cfg, source, path = hf_checkpoint
    mesh = shd.make_mesh(2, 2, 2, devices=devices8)

    # Count what each device's read callback materialises from the memory-mapped files.
    counter = [0]
    reads: list[tuple] = []
    real_array, real_from_callback = SafetensorsDir.array, jax.make_array_from_callback

    def counting_array(self, key):
        return _CountingTensor(real_array(self, key), counter)

    def spy_from_callback(shape, sharding, callback, *args, **kwargs):
        def counted(index):
            before = counter[0]
            out = callback(index)
            reads.append((shape, sharding, out.shape, counter[0] - before))
            return out
        return real_from_callback(shape, sharding, counted, *args, **kwargs)

    monkeypatch.setattr(SafetensorsDir, "array", counting_array)
    monkeypatch.setattr(jax, "make_array_from_callback", spy_from_callback)
    sharded = load_hf(path, mesh=mesh)
    monkeypatch.undo()

    assert sharded.config == cfg
    n_params = len(jax.tree.leaves(sharded.params))
    assert len(reads) >= n_params  # at least one read per param (one per device, in fact)
    partial = 0
    for shape, sharding, out_shape, n_read in reads:
        local = sharding.shard_shape(shape)
        assert out_shape == local, (shape, sharding.spec, out_shape)
        assert n_read == math.prod(local), (
            f"a read callback for a {shape} param sharded {sharding.spec} materialised "
            f"{n_read} elements; its shard has {math.prod(local)}")
        partial += math.prod(local) < math.prod(shape)
    assert partial == len(reads)  # on (2,2,2) every param is split, so no read is whole

    # Placed with the declared NamedShardings.
    expected = param_shardings(cfg, mesh)
    for (path_, x), s in zip(_leaves_with_paths(sharded.params), jax.tree.leaves(expected)):
        assert isinstance(x.sharding, NamedSharding) and x.sharding == s, (path_, x.sharding, s)
    p = sharded.params
    assert p["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["attn"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert p["embed"].sharding.spec == P("tensor", "fsdp")
    assert p["layers"]["mlp"]["down"].sharding.spec == P(None, "tensor", "fsdp")
    assert p["final_norm"]["scale"].sharding.spec == P("fsdp")
    if not cfg.tie_word_embeddings:
        assert p["lm_head"].sharding.spec == P("fsdp", "tensor")
    if cfg.qkv_bias:
        assert p["layers"]["attn"]["q_bias"].sharding.spec == P(None, "tensor", None)

    # Same values and the same forward as the unsharded load (and as the saved model).
    unsharded = load_hf(path)
    assert unsharded.config == cfg
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(unsharded.params))
    for a, b, c in zip(*(jax.tree.leaves(m.params) for m in (sharded, unsharded, source))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c))
    batch = make_packed_batch(BATCH, LENGTH, cfg.vocab_size)
    ref = np.asarray(jax.jit(_fwd)(unsharded, batch["tokens"], batch["segment_ids"]))
    logits = np.asarray(_sharded_forward(sharded, batch, mesh))
    diff = float(np.max(np.abs(logits - ref)))
    print(f"load_hf {cfg.family} (2,2,2): max|sharded - unsharded| = {diff:.3g} "
          f"(max|logit| {np.abs(ref).max():.3g})")
    assert diff <= ATOL, diff


def test_load_hf_rejects_transposed_tensor(hf_checkpoint, tmp_path):
    """A tensor with the right number of elements but the wrong layout is an error, not a
    silently scrambled weight (e.g. a (hidden, mlp) gate_proj where HF stores (mlp, hidden))."""
    cfg, _, path = hf_checkpoint
    st = SafetensorsDir(path)
    tensors = {k: np.asarray(st.array(k)) for k in st.keys()}
    name = "model.layers.1.mlp.gate_proj.weight"
    tensors[name] = np.ascontiguousarray(tensors[name].T)
    bad = tmp_path / "bad"
    bad.mkdir()
    write_safetensors(bad / "model.safetensors", tensors)
    (bad / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(CheckpointError, match="gate_proj"):
        load_hf(bad)


# ----------------------------------------------------------------------------- full-size presets
def _llama31_8b() -> ModelConfig:
    return ModelConfig(
        family="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5,
        rope_theta=500000.0, rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072, bos_token_id=128000, eos_token_id=(128001, 128008, 128009),
        dtype="bfloat16")


def _qwen25_7b() -> ModelConfig:
    return ModelConfig(
        family="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
        num_layers=28, num_heads=28, num_kv_heads=4, head_dim=128, qkv_bias=True,
        rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=131072,
        eos_token_id=151643, dtype="bfloat16")


def _gemma2_9b() -> ModelConfig:
    return ModelConfig(
        family="gemma2", vocab_size=256000, hidden_size=3584, intermediate_size=14336,
        num_layers=42, num_heads=16, num_kv_heads=8, head_dim=256, rms_norm_eps=1e-6,
        rope_theta=10000.0, max_position_embeddings=8192, tie_word_embeddings=True,
        gemma_norm=True, sandwich_norm=True, embed_scale=True, activation="gelu_tanh",
        query_pre_attn_scalar=256, attn_logit_softcap=50.0, final_logit_softcap=30.0,
        sliding_window=4096, layer_types=tuple("sliding" if i % 2 == 0 else "full" for i in range(42)),
        bos_token_id=2, eos_token_id=1, pad_token_id=0, dtype="bfloat16")


# Parameter counts of the real checkpoints, as transformers counts them: the sum of numel over
# AutoModelForCausalLM.from_config(...) built on torch's meta device (tied weights counted once);
# test_full_size_counts_match_transformers recomputes them.
FULL_SIZE = {
    "llama-3.1-8b": (_llama31_8b, 8_030_261_248),
    "qwen2.5-7b": (_qwen25_7b, 7_615_616_512),
    "gemma-2-9b": (_gemma2_9b, 9_241_705_984),
}


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_presets_are_abstract_and_counted(devices8, name):
    make_cfg, count = FULL_SIZE[name]
    cfg = make_cfg()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    shapes = param_shapes(cfg)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(shapes))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == count
    assert cfg.num_params() == count

    # Tracing init on a mesh builds the whole (abstract) model without allocating it.
    mesh = shd.make_mesh(1, 4, 2, devices=devices8)
    abstract = jax.eval_shape(lambda: init(cfg, 0, mesh=mesh))
    assert jax.tree.map(lambda s: (s.shape, s.dtype), abstract.params) == \
        jax.tree.map(lambda s: (s.shape, s.dtype), shapes)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    assert grown_mib < 512, f"abstract {name} grew peak memory by {grown_mib:.0f} MiB"

    # On (fsdp=4, tensor=2) every device holds about an eighth of the model.
    shardings = param_shardings(cfg, mesh)
    per_device = sum(math.prod(s.shard_shape(x.shape))
                     for x, s in zip(jax.tree.leaves(shapes), jax.tree.leaves(shardings)))
    assert per_device <= count / 8 * 1.001, (per_device, count / 8)
    q = shardings["layers"]["attn"]["q"]
    assert q.spec == P(None, "fsdp", "tensor", None)
    assert shardings["embed"].spec == P("tensor", "fsdp")


@pytest.mark.parametrize("name", FULL_SIZE)
def test_full_size_counts_match_transformers(name):
    """The reference counts above, recomputed independently by transformers (meta device)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from distill_jax.models import to_hf_config

    make_cfg, count = FULL_SIZE[name]
    hf_config = transformers.AutoConfig.for_model(**to_hf_config(make_cfg(), dtype="bfloat16"))
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert sum(p.numel() for p in model.parameters()) == count
