"""One decoder-only transformer for every supported family, as Flax NNX modules.

Modules hold the structure and the initialisers; everything that runs is used functionally:
``distill_jax.models.Model`` keeps the params as a plain nested dict and merges them into the
module graph inside the traced function. Every parameter carries its logical axis names in the
``axes`` metadata of its ``nnx.Param`` (``vocab``, ``embed``, ``heads``, ``kv_heads``,
``head_dim``, ``mlp``); stacked layers add a leading ``layers`` axis.

Shape suffixes: B batch, T query length, S key length, D hidden, N query heads, K kv heads,
G heads per kv head, H head_dim, F mlp, V vocab, L layers.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.models.config import ModelConfig, rope_inv_freq

Array = jax.Array
_NEG = -0.7 * float(jnp.finfo(jnp.float32).max)


def constrain_batch(x: Array) -> Array:
    """``x`` (batch first) constrained to be sharded over the batch axes (``data``, ``fsdp``) of
    the ambient mesh (``jax.set_mesh``), where there is one and they divide the batch.

    Without it, XLA's sharding propagation may follow the fsdp-sharded weights into the
    activations: the matmuls get split over the hidden width and every device holds the whole
    batch's activations. With it, fsdp is fsdp: weights are gathered per layer and activations
    stay split by rows. Outside a mesh context (a plain ``jax.jit``), ``x`` is returned as is."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    if not axes or x.shape[0] % size:
        return x
    spec = jax.sharding.PartitionSpec(axes if len(axes) > 1 else axes[0])
    return jax.lax.with_sharding_constraint(x, spec)


def _low_precision_dots() -> bool:
    """Whether low-precision matmuls go through :func:`_einsum_acc32` (XLA's CPU backend)."""
    return jax.default_backend() == "cpu"


def _acc32(subscripts: str, a: Array, b: Array, dtype: Any) -> Array:
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _einsum_acc32(subscripts: str, x: Array, w: Array) -> Array:
    return _acc32(subscripts, x, w, x.dtype)


def _einsum_acc32_fwd(subscripts, x, w):
    return _acc32(subscripts, x, w, x.dtype), (x, w)


def _einsum_acc32_bwd(subscripts, res, g):
    x, w = res
    ins, out = subscripts.split("->")
    a, b = ins.split(",")
    return _acc32(f"{out},{b}->{a}", g, w, x.dtype), _acc32(f"{a},{out}->{b}", x, g, w.dtype)


_einsum_acc32.defvjp(_einsum_acc32_fwd, _einsum_acc32_bwd)


def proj(subscripts: str, x: Array, w: Array) -> Array:
    """``jnp.einsum(subscripts, x, w)`` in ``x``'s dtype, with fp32 accumulation.

    The same numbers as a plain einsum everywhere; the difference is speed on XLA's CPU backend.
    There a dot whose output is bf16 runs as an fp32 dot between converts (about 3x slower than
    a bf16 x bf16 -> fp32 dot on a CPU with bf16 instructions), so with a low-precision ``x`` on
    CPU the forward and both backward products are bf16 x bf16 -> fp32 dots, rounded to the
    input dtypes as a bf16 dot rounds. Every index of ``x`` must appear in ``w`` or the output
    and every index of ``w`` in ``x`` or the output (true of the model's projections)."""
    if x.dtype == jnp.float32 or x.dtype != w.dtype or not _low_precision_dots():
        return jnp.einsum(subscripts, x, w)
    return _einsum_acc32(subscripts, x, w)


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], axes: tuple[str, ...], *,
           std: float | None, dtype: str) -> nnx.Param:
    """A parameter with logical axis names; ``std=None`` means zeros, ``std=-1`` ones."""
    if std is None:
        value = jnp.zeros(shape, dtype)
    elif std < 0:
        value = jnp.ones(shape, dtype)
    else:
        value = (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, axes=axes)


def _add_lora(module: nnx.Module, cfg: ModelConfig, rngs: nnx.Rngs,
              shapes: dict[str, tuple[tuple[int, ...], tuple[str, ...], tuple[int, ...],
                                      tuple[str, ...]]]) -> None:
    """LoRA adapters ``{name}_lora_a`` (in dims..., rank) and ``{name}_lora_b`` (rank, out
    dims...) for each of ``shapes`` (name: in shape, in axes, out shape, out axes) that
    ``cfg.lora`` targets. A is uniform(+-1/sqrt(fan_in)) (PEFT's default, torch's Linear init),
    B zero; both float32 whatever the base's param dtype."""
    if cfg.lora is None:
        return
    r = cfg.lora.rank
    for name, (in_shape, in_axes, out_shape, out_axes) in shapes.items():
        if name not in cfg.lora.targets:
            continue
        bound = 1.0 / float(np.prod(in_shape)) ** 0.5
        a = jax.random.uniform(rngs.params(), (*in_shape, r), jnp.float32, -bound, bound)
        setattr(module, f"{name}_lora_a", nnx.Param(a, axes=(*in_axes, "lora")))
        setattr(module, f"{name}_lora_b", nnx.Param(jnp.zeros((r, *out_shape), jnp.float32),
                                                    axes=("lora", *out_axes)))


def _lora(module: nnx.Module, cfg: ModelConfig, name: str, x: Array, y: Array,
          keys_B2: Array | None) -> Array:
    """``y`` plus target ``name``'s adapter output ``scale * dropout(x) @ A @ B`` (``y`` itself
    when ``name`` is not adapted). ``keys_B2``: per-row dropout keys (None: no dropout, as in
    evaluation); every target draws its own mask."""
    spec = cfg.lora
    if spec is None or name not in spec.targets:
        return y
    dt = x.dtype
    a = getattr(module, f"{name}_lora_a")[...].astype(dt)
    b = getattr(module, f"{name}_lora_b")[...].astype(dt)
    if keys_B2 is not None and spec.dropout > 0:
        salt, rate = spec.targets.index(name), spec.dropout

        def drop(key, x_row):
            key = jax.random.fold_in(jax.random.wrap_key_data(key), salt)
            keep = jax.random.bernoulli(key, 1.0 - rate, x_row.shape)
            return jnp.where(keep, x_row / (1.0 - rate), 0).astype(dt)
        x = jax.vmap(drop)(keys_B2, x)
    z = jnp.tensordot(x, a, axes=a.ndim - 1)  # (..., rank)
    return y + (jnp.tensordot(z, b, axes=1) * jnp.asarray(spec.scale, dt)).astype(y.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm in fp32; Gemma flavour scales by (1 + w) with w initialised at zero."""

    def __init__(self, dim: int, axis: str, cfg: ModelConfig):
        self.gemma = cfg.gemma_norm
        self.eps = cfg.rms_norm_eps
        self.scale = _param(None, (dim,), (axis,), std=None if cfg.gemma_norm else -1,
                            dtype=cfg.param_dtype)

    def __call__(self, x: Array) -> Array:
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        w = self.scale[...].astype(jnp.float32)
        if self.gemma:  # Gemma: (1 + w) in fp32, then cast
            return (x * (1.0 + w)).astype(dtype)
        # Llama: cast the normalised input to the compute dtype first, then scale (as HF does)
        return (w * x.astype(dtype).astype(jnp.float32)).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, n, k, h, p = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        s = cfg.init_std
        self.cfg = cfg
        self.q = _param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std=s, dtype=p)
        self.k = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=s, dtype=p)
        self.v = _param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=s, dtype=p)
        self.o = _param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std=s, dtype=p)
        if cfg.qkv_bias:
            self.q_bias = _param(None, (n, h), ("heads", "head_dim"), std=None, dtype=p)
            self.k_bias = _param(None, (k, h), ("kv_heads", "head_dim"), std=None, dtype=p)
            self.v_bias = _param(None, (k, h), ("kv_heads", "head_dim"), std=None, dtype=p)
        if cfg.out_bias:
            self.o_bias = _param(None, (d,), ("embed",), std=None, dtype=p)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(h, "head_dim", cfg)
            self.k_norm = RMSNorm(h, "head_dim", cfg)
        _add_lora(self, cfg, rngs, {
            "q": ((d,), ("embed",), (n, h), ("heads", "head_dim")),
            "k": ((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
            "v": ((d,), ("embed",), (k, h), ("kv_heads", "head_dim")),
            "o": ((n, h), ("heads", "head_dim"), (d,), ("embed",))})

    def __call__(self, x_BTD: Array, rope: tuple[Array, Array], mask_BTS: Array,
                 kv_cache: tuple[Array, Array] | None = None, cache_index: Array | None = None,
                 lora_keys: Array | None = None):
        cfg = self.cfg
        dt = x_BTD.dtype
        q_BTNH = proj("btd,dnh->btnh", x_BTD, self.q[...].astype(dt))
        k_BTKH = proj("btd,dkh->btkh", x_BTD, self.k[...].astype(dt))
        v_BTKH = proj("btd,dkh->btkh", x_BTD, self.v[...].astype(dt))
        q_BTNH = _lora(self, cfg, "q", x_BTD, q_BTNH, lora_keys)
        k_BTKH = _lora(self, cfg, "k", x_BTD, k_BTKH, lora_keys)
        v_BTKH = _lora(self, cfg, "v", x_BTD, v_BTKH, lora_keys)
        if cfg.qkv_bias:
            q_BTNH = q_BTNH + self.q_bias[...].astype(dt)
            k_BTKH = k_BTKH + self.k_bias[...].astype(dt)
            v_BTKH = v_BTKH + self.v_bias[...].astype(dt)
        if cfg.qk_norm:
            q_BTNH = self.q_norm(q_BTNH)
            k_BTKH = self.k_norm(k_BTKH)
        q_BTNH = apply_rope(q_BTNH, *rope)
        k_BTKH = apply_rope(k_BTKH, *rope)
        new_cache = None
        if kv_cache is not None:
            # The stacked (L, B, S, K, H) caches are updated in place at (layer, :, index).
            k_all, v_all, layer = kv_cache
            at = (layer, 0, cache_index, 0, 0)
            k_all = jax.lax.dynamic_update_slice(k_all, k_BTKH[None].astype(k_all.dtype), at)
            v_all = jax.lax.dynamic_update_slice(v_all, v_BTKH[None].astype(v_all.dtype), at)
            new_cache = (k_all, v_all)
            k_BSKH = jax.lax.dynamic_index_in_dim(k_all, layer, 0, keepdims=False).astype(dt)
            v_BSKH = jax.lax.dynamic_index_in_dim(v_all, layer, 0, keepdims=False).astype(dt)
        else:
            k_BSKH, v_BSKH = k_BTKH, v_BTKH
        b, t, n, h = q_BTNH.shape
        kh = k_BSKH.shape[2]

        def one_group(q_BTKH):
            # the query heads that share each kv head one at a time (vmapped over the group):
            # XLA then needs no transposes of the (T, S) scores, which on CPU made attention
            # cost 2.5x more than with this layout (benchmarks/train_throughput.py)
            s_BKTS = jnp.einsum("btkh,bskh->bkts", q_BTKH, k_BSKH,
                                preferred_element_type=jnp.float32) * cfg.attn_scale
            if cfg.attn_logit_softcap:
                s_BKTS = jnp.tanh(s_BKTS / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
            s_BKTS = jnp.where(mask_BTS[:, None], s_BKTS, _NEG)
            p_BKTS = jax.nn.softmax(s_BKTS, axis=-1).astype(dt)
            return proj("bkts,bskh->btkh", p_BKTS, v_BSKH)

        o_BTKGH = jax.vmap(one_group, in_axes=3, out_axes=3)(q_BTNH.reshape(b, t, kh, n // kh, h))
        o_BTNH = o_BTKGH.reshape(b, t, n, h)
        out_BTD = proj("btnh,nhd->btd", o_BTNH, self.o[...].astype(dt))
        out_BTD = _lora(self, cfg, "o", o_BTNH, out_BTD, lora_keys)
        if cfg.out_bias:
            out_BTD = out_BTD + self.o_bias[...].astype(dt)
        return out_BTD, new_cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, p, s = cfg.hidden_size, cfg.intermediate_size, cfg.param_dtype, cfg.init_std
        self.cfg = cfg
        self.activation = cfg.activation
        self.gate = _param(rngs, (d, f), ("embed", "mlp"), std=s, dtype=p)
        self.up = _param(rngs, (d, f), ("embed", "mlp"), std=s, dtype=p)
        self.down = _param(rngs, (f, d), ("mlp", "embed"), std=s, dtype=p)
        self.bias = cfg.mlp_bias
        if cfg.mlp_bias:
            self.gate_bias = _param(None, (f,), ("mlp",), std=None, dtype=p)
            self.up_bias = _param(None, (f,), ("mlp",), std=None, dtype=p)
            self.down_bias = _param(None, (d,), ("embed",), std=None, dtype=p)
        _add_lora(self, cfg, rngs, {"gate": ((d,), ("embed",), (f,), ("mlp",)),
                                    "up": ((d,), ("embed",), (f,), ("mlp",)),
                                    "down": ((f,), ("mlp",), (d,), ("embed",))})

    def __call__(self, x_BTD: Array, lora_keys: Array | None = None) -> Array:
        dt = x_BTD.dtype
        g_BTF = _lora(self, self.cfg, "gate", x_BTD, proj("...d,df->...f", x_BTD, self.gate[...].astype(dt)), lora_keys)
        u_BTF = _lora(self, self.cfg, "up", x_BTD, proj("...d,df->...f", x_BTD, self.up[...].astype(dt)), lora_keys)
        if self.bias:
            g_BTF = g_BTF + self.gate_bias[...].astype(dt)
            u_BTF = u_BTF + self.up_bias[...].astype(dt)
        act = jax.nn.silu if self.activation == "silu" else (
            lambda z: jax.nn.gelu(z, approximate=True))
        a_BTF = act(g_BTF) * u_BTF
        y_BTD = _lora(self, self.cfg, "down", a_BTF, proj("...f,fd->...d", a_BTF, self.down[...].astype(dt)), lora_keys)
        if self.bias:
            y_BTD = y_BTD + self.down_bias[...].astype(dt)
        return y_BTD


class Block(nnx.Module):
    """One pre-norm decoder layer (with Gemma's extra post-norms when ``sandwich_norm``)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.sandwich = cfg.sandwich_norm
        self.attn_norm = RMSNorm(d, "embed", cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(d, "embed", cfg)
        self.mlp = MLP(cfg, rngs)
        if cfg.sandwich_norm:
            self.post_attn_norm = RMSNorm(d, "embed", cfg)
            self.post_mlp_norm = RMSNorm(d, "embed", cfg)

    def __call__(self, x_BTD, rope, mask_BTS, kv_cache=None, cache_index=None, lora_keys=None):
        y_BTD, new_cache = self.attn(self.attn_norm(x_BTD), rope, mask_BTS, kv_cache, cache_index,
                                     lora_keys)
        if self.sandwich:
            y_BTD = self.post_attn_norm(y_BTD)
        x_BTD = x_BTD + y_BTD
        y_BTD = self.mlp(self.mlp_norm(x_BTD), lora_keys)
        if self.sandwich:
            y_BTD = self.post_mlp_norm(y_BTD)
        return x_BTD + y_BTD, new_cache


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Transformer(nnx.Module):
    """Embedding, a scanned stack of :class:`Block`, final norm and (untied) lm_head."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                            std=cfg.init_std, dtype=cfg.param_dtype)

        @nnx.vmap(in_axes=0, out_axes=0)
        def make_layers(key):
            return Block(cfg, nnx.Rngs(params=key))

        self.layers = make_layers(jax.random.split(rngs.params(), cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, "embed", cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  std=cfg.init_std, dtype=cfg.param_dtype)

    def embed_tokens(self, tokens_BT: Array) -> Array:
        cfg = self.cfg
        dt = jnp.dtype(cfg.dtype)
        x_BTD = jnp.take(self.embed[...], tokens_BT, axis=0).astype(dt)
        if cfg.embed_scale:
            x_BTD = x_BTD * jnp.asarray(cfg.hidden_size ** 0.5, dt)
        return x_BTD

    def __call__(self, tokens_BT: Array, positions_BT: Array, segment_ids_BT: Array,
                 cache: dict[str, Array] | None = None, lora_keys: Array | None = None):
        """Final hidden states (after the final norm), and the updated cache when given one.

        ``lora_keys`` (B, 2): per-row key data for the LoRA adapters' dropout (training only;
        None: no dropout). Each layer and target folds in its own index.

        Without a cache, the keys are the queries' own tokens: causal within each segment.
        With a cache (see :func:`distill_jax.models.generate.init_cache`), the new tokens are
        written at ``cache["index"]`` and attend to every valid earlier slot.
        """
        cfg = self.cfg
        x_BTD = constrain_batch(self.embed_tokens(tokens_BT))
        t = tokens_BT.shape[1]
        if cache is None:
            q_slot = jnp.arange(t)
            kv_slot, kv_pos_BS, kv_seg_BS = q_slot, positions_BT, segment_ids_BT
            index = None
        else:
            index = cache["index"]
            q_slot = index + jnp.arange(t)
            kv_slot = jnp.arange(cache["k"].shape[2])
            kv_pos_BS = jax.lax.dynamic_update_slice_in_dim(cache["pos"], positions_BT, index, 1)
            kv_seg_BS = jax.lax.dynamic_update_slice_in_dim(cache["seg"], segment_ids_BT, index, 1)
        base_mask_BTS = ((kv_slot[None, None, :] <= q_slot[None, :, None])
                         & (segment_ids_BT[:, :, None] == kv_seg_BS[:, None, :]))
        dist_BTS = positions_BT[:, :, None] - kv_pos_BS[:, None, :]
        window_mask_BTS = base_mask_BTS & (dist_BTS < (cfg.sliding_window or 1))

        rope_global = rope_tables(positions_BT, cfg.rope_theta, cfg.head_dim, cfg.rope_scaling)
        rope_local = rope_global if cfg.local_rope_theta is None else rope_tables(
            positions_BT, cfg.local_rope_theta, cfg.head_dim, None)
        sliding_L = jnp.asarray([lt == "sliding" for lt in cfg.layer_types])

        graphdef, state = nnx.split(self.layers)

        def body(carry, xs):
            x_BTD, kv = carry
            layer_state, sliding, layer = xs
            block = nnx.merge(graphdef, layer_state)
            mask = jnp.where(sliding, window_mask_BTS, base_mask_BTS)
            rope = tuple(jnp.where(sliding, lo, gl) for lo, gl in zip(rope_local, rope_global))
            keys = None if lora_keys is None else jax.vmap(lambda k: jax.random.key_data(
                jax.random.fold_in(jax.random.wrap_key_data(k), layer)))(lora_keys)
            x_BTD, kv = block(x_BTD, rope, mask, None if kv is None else (*kv, layer), index, keys)
            return (constrain_batch(x_BTD), kv), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        kv_in = None if cache is None else (cache["k"], cache["v"])
        layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
        (x_BTD, kv_out), _ = jax.lax.scan(body, (x_BTD, kv_in), (state, sliding_L, layer_ids))
        h_BTD = self.final_norm(x_BTD)
        if cache is None:
            return h_BTD, None
        new_cache = dict(k=kv_out[0], v=kv_out[1], pos=kv_pos_BS, seg=kv_seg_BS, index=index + t)
        return h_BTD, new_cache

    def lm_head_kernel(self) -> Array:
        """The (D, V) output projection (the transposed embedding when tied)."""
        return self.embed[...].T if self.cfg.tie_word_embeddings else self.lm_head[...]


def head_logits(h_XD: Array, kernel_DV: Array, softcap: float | None = None) -> Array:
    """fp32 logits ``h @ kernel`` (kernel cast to h's dtype, fp32 accumulation) over any leading
    dims, then the final-logit softcap ``tanh(z / c) * c`` when ``softcap`` is set. The one
    implementation of the output head: the model's forward and the chunked losses call it."""
    logits = jnp.einsum("...d,dv->...v", h_XD, kernel_DV.astype(h_XD.dtype),
                        preferred_element_type=jnp.float32)
    if softcap:
        logits = jnp.tanh(logits / softcap) * softcap
    return logits


def logits_from_hidden(cfg: ModelConfig, h_BTD: Array, kernel_DV: Array) -> Array:
    """fp32 logits from final hidden states, with final-logit softcapping where configured."""
    return head_logits(h_BTD, kernel_DV, cfg.final_logit_softcap)


def rope_tables(positions_BT: Array, theta: float, head_dim: int, scaling) -> tuple[Array, Array]:
    """cos and sin tables (B, T, H/2) in fp32 for the given positions."""
    inv = jnp.asarray(rope_inv_freq(theta, head_dim, scaling), jnp.float32)
    ang_BTh = positions_BT.astype(jnp.float32)[..., None] * inv
    return jnp.cos(ang_BTh), jnp.sin(ang_BTh)


def apply_rope(x_BTNH: Array, cos_BTh: Array, sin_BTh: Array) -> Array:
    """Rotary embedding in the "rotate half" layout (what Hugging Face checkpoints use)."""
    dt = x_BTNH.dtype
    x = x_BTNH.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos_BTh[:, :, None, :], sin_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(dt)


def positions_from_segments(segment_ids_BT: Array) -> Array:
    """Positions that restart at 0 at the start of each segment (document) of a packed row."""
    t = segment_ids_BT.shape[1]
    idx = jnp.arange(t)[None, :]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids_BT[:, :1], bool),
         segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return (idx - start_idx).astype(jnp.int32)


def build(cfg: ModelConfig, seed: int | Any = 0) -> Transformer:
    """Instantiate the module (real arrays; wrap in ``nnx.eval_shape`` for abstract ones)."""
    key = jax.random.key(seed) if isinstance(seed, int) else seed
    return Transformer(cfg, nnx.Rngs(params=key))
