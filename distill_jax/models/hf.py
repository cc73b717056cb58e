"""Hugging Face checkpoint directories in and out (config.json + safetensors).

Loading memory-maps each safetensors file and builds every parameter with
``jax.make_array_from_callback``: each device's callback reads only its own slice of the
tensor, so no host ever holds a whole large model. Saving streams one tensor at a time into
(optionally several) safetensors files and writes the directory atomically.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import Mesh, SingleDeviceSharding

from distill_jax import fsutil
from distill_jax.models.config import ConfigError, ModelConfig, from_hf_config, to_hf_config
from distill_jax.models.model import Model, logical_axes, param_shapes, param_shardings

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Tensors some checkpoints carry that do not affect the computation.
_HARMLESS_SUFFIXES = (".rotary_emb.inv_freq",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json", "generation_config.json")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or tensors, or holds unexpected ones."""


# ----------------------------------------------------------------------------- safetensors
class SafetensorsDir:
    """Read-only, memory-mapped view of every tensor in a directory's safetensors files."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        else:
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise CheckpointError(f"no *.safetensors files in {self.path}; a Hugging Face "
                                  "checkpoint directory needs config.json and model.safetensors")
        self._where: dict[str, tuple[Path, str, list[int], int]] = {}
        for name in files:
            file = self.path / name
            if not file.exists():
                raise CheckpointError(f"{file} is listed in the index but missing")
            with open(file, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            header.pop("__metadata__", None)
            for key, info in header.items():
                if info["dtype"] not in _ST_DTYPES:
                    raise CheckpointError(f"{file}: tensor {key} has unsupported dtype {info['dtype']}")
                start = 8 + n + info["data_offsets"][0]
                self._where[key] = (file, info["dtype"], info["shape"], start)

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][2])

    def array(self, key: str) -> np.ndarray:
        """A lazy memory map of one tensor (slicing it reads only what is sliced)."""
        file, dtype, shape, start = self._where[key]
        if 0 in shape:
            return np.zeros(shape, _ST_DTYPES[dtype])
        return np.memmap(file, dtype=_ST_DTYPES[dtype], mode="r", offset=start, shape=tuple(shape))


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write one safetensors file, tensor by tensor (bf16 and fp8 included)."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for key, arr in tensors.items():
        size = arr.size * arr.dtype.itemsize
        header[key] = {"dtype": _NP_TO_ST[arr.dtype], "shape": list(arr.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in tensors.values():
            f.write(np.ascontiguousarray(arr).tobytes())


# ----------------------------------------------------------------------------- name mapping
# Each entry: our path (within a layer for stacked params), HF name, and how an HF tensor maps
# onto ours: ``ours = hf.reshape(split).transpose(perm)`` (both views, so slicing stays lazy).
def _mapping(cfg: ModelConfig) -> list[tuple[tuple[str, ...], str, bool, tuple, tuple]]:
    d, n, k, h, f = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.intermediate_size
    L = "model.layers.{i}."
    m: list[tuple[tuple[str, ...], str, bool, tuple, tuple]] = [
        (("embed",), "model.embed_tokens.weight", False, (cfg.vocab_size, d), (0, 1)),
        (("final_norm", "scale"), "model.norm.weight", False, (d,), (0,)),
        (("layers", "attn", "q"), L + "self_attn.q_proj.weight", True, (n, h, d), (2, 0, 1)),
        (("layers", "attn", "k"), L + "self_attn.k_proj.weight", True, (k, h, d), (2, 0, 1)),
        (("layers", "attn", "v"), L + "self_attn.v_proj.weight", True, (k, h, d), (2, 0, 1)),
        (("layers", "attn", "o"), L + "self_attn.o_proj.weight", True, (d, n, h), (1, 2, 0)),
        (("layers", "mlp", "gate"), L + "mlp.gate_proj.weight", True, (f, d), (1, 0)),
        (("layers", "mlp", "up"), L + "mlp.up_proj.weight", True, (f, d), (1, 0)),
        (("layers", "mlp", "down"), L + "mlp.down_proj.weight", True, (d, f), (1, 0)),
        (("layers", "attn_norm", "scale"), L + "input_layernorm.weight", True, (d,), (0,)),
    ]
    if cfg.sandwich_norm:
        m += [
            (("layers", "post_attn_norm", "scale"), L + "post_attention_layernorm.weight", True, (d,), (0,)),
            (("layers", "mlp_norm", "scale"), L + "pre_feedforward_layernorm.weight", True, (d,), (0,)),
            (("layers", "post_mlp_norm", "scale"), L + "post_feedforward_layernorm.weight", True, (d,), (0,)),
        ]
    else:
        m.append((("layers", "mlp_norm", "scale"), L + "post_attention_layernorm.weight", True, (d,), (0,)))
    if cfg.qkv_bias:
        m += [(("layers", "attn", f"{x}_bias"), L + f"self_attn.{x}_proj.bias", True, (nh, h), (0, 1))
              for x, nh in (("q", n), ("k", k), ("v", k))]
    if cfg.out_bias:
        m.append((("layers", "attn", "o_bias"), L + "self_attn.o_proj.bias", True, (d,), (0,)))
    if cfg.mlp_bias:
        m += [(("layers", "mlp", f"{x}_bias"), L + f"mlp.{x}_proj.bias", True, (dim,), (0,))
              for x, dim in (("gate", f), ("up", f), ("down", d))]
    if cfg.qk_norm:
        m += [(("layers", "attn", "q_norm", "scale"), L + "self_attn.q_norm.weight", True, (h,), (0,)),
              (("layers", "attn", "k_norm", "scale"), L + "self_attn.k_norm.weight", True, (h,), (0,))]
    if not cfg.tie_word_embeddings:
        m.append((("lm_head",), "lm_head.weight", False, (cfg.vocab_size, d), (1, 0)))
    return m


def _hf_shape(name: str, split: tuple[int, ...]) -> tuple[int, ...]:
    """The shape a checkpoint stores a tensor in: ``split`` with the head axes merged back."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return (split[0] * split[1], split[2])  # (heads, head_dim, embed)
    if name.endswith("o_proj.weight"):
        return (split[0], split[1] * split[2])  # (embed, heads, head_dim)
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return (split[0] * split[1],)
    return tuple(split)


def _set(tree: dict, path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        tree = tree[key]
    return tree


# ----------------------------------------------------------------------------- loading
def load_hf(path: str | os.PathLike, *, mesh: Mesh | None = None,
            rules: Mapping[str, Any] | None = None, param_dtype: str = "float32",
            dtype: str | None = None, **config_overrides: Any) -> Model:
    """Load a Hugging Face checkpoint directory (config.json + safetensors) into a Model.

    With ``mesh``, parameters are placed sharded by the logical-axis ``rules`` and each device
    reads only its own slice from the memory-mapped files. ``dtype`` is the compute dtype
    (default: float32), ``param_dtype`` the stored parameter dtype. Other keyword arguments
    override :class:`ModelConfig` fields (e.g. ``remat="full"``).
    """
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise CheckpointError(f"{cfg_file} not found: expected a Hugging Face checkpoint "
                              "directory with config.json and *.safetensors")
    overrides = dict(config_overrides, param_dtype=param_dtype)
    if dtype is not None:
        overrides["dtype"] = dtype
    cfg = from_hf_config(json.loads(cfg_file.read_text()), **overrides)
    st = SafetensorsDir(path)
    mapping = _mapping(cfg)
    expected = set()
    for _, name, stacked, _, _ in mapping:
        names = [name.format(i=i) for i in range(cfg.num_layers)] if stacked else [name]
        for nm in names:
            expected.add(nm)
            if nm not in st:
                raise CheckpointError(f"{path}: tensor {nm} is missing from the checkpoint")
    extra = [k for k in st.keys() if k not in expected and not k.endswith(_HARMLESS_SUFFIXES)
             and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if extra:
        raise CheckpointError(f"{path}: tensors not used by a {cfg.family} model: {sorted(extra)[:8]}"
                              f"{' ...' if len(extra) > 8 else ''}; the config and weights disagree")
    shapes = param_shapes(cfg)
    shardings = (param_shardings(cfg, mesh, rules) if mesh is not None else
                 jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shapes))
    pdt = np.dtype(jnp.dtype(param_dtype))
    params: dict[str, Any] = {}
    for ours, name, stacked, split, perm in mapping:
        shape = _get(shapes, ours).shape

        def view(i: int | None, name=name, split=split, perm=perm) -> np.ndarray:
            nm = name.format(i=i) if i is not None else name
            arr = st.array(nm)
            want = _hf_shape(nm, split)
            if tuple(arr.shape) != want:
                raise CheckpointError(f"{nm} has shape {tuple(arr.shape)}; the config implies {want}")
            return arr.reshape(split).transpose(perm)

        def read(index, stacked=stacked, view=view) -> np.ndarray:
            if stacked:
                layers = range(cfg.num_layers)[index[0]]
                return np.stack([np.asarray(view(i)[index[1:]], pdt) for i in layers])
            return np.asarray(view(None)[index], pdt)

        _set(params, ours, jax.make_array_from_callback(shape, _get(shardings, ours), read))
    return Model(cfg, params)


# ----------------------------------------------------------------------------- saving
def _host_array(x: jax.Array) -> np.ndarray:
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def _hf_tensors(model: Model, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    cfg = model.config
    for ours, name, stacked, split, perm in _mapping(cfg):
        inv = np.argsort(perm)
        value = _get(model.params, ours)
        for i in range(cfg.num_layers) if stacked else [None]:
            arr = _host_array(value[i] if stacked else value).transpose(inv)
            nm = name.format(i=i) if stacked else name
            yield nm, np.ascontiguousarray(_to_hf_shape(nm, arr, cfg)).astype(dtype)


def _to_hf_shape(name: str, arr: np.ndarray, cfg: ModelConfig) -> np.ndarray:
    """Collapse our split head axes back into HF's 2-D (out, in) / 1-D bias layout."""
    if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
        return arr.reshape(-1, cfg.hidden_size)
    if name.endswith("o_proj.weight"):
        return arr.reshape(cfg.hidden_size, -1)
    if name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
        return arr.reshape(-1)
    return arr


def save_hf(model: Model, path: str | os.PathLike, *, tokenizer: Any = None,
            dtype: str = "float32", max_shard_bytes: int = 5 * 2**30,
            overwrite: bool = False) -> Path:
    """Write ``model`` as a Hugging Face directory that transformers loads.

    ``tokenizer`` may be a transformers tokenizer (saved with ``save_pretrained``) or a
    directory whose tokenizer files are copied. Tensors are streamed one at a time into
    safetensors files of at most ``max_shard_bytes`` (with an index when there are several).
    ``path`` must be missing or empty, or, with ``overwrite=True``, hold a previous export and
    nothing else (see :mod:`distill_jax.fsutil`); it is replaced atomically. In multi-process
    runs every process must call this (arrays are gathered; every process checks ``path``
    first) and only process 0 writes.
    """
    np_dtype = np.dtype(jnp.dtype(dtype))
    hf_cfg = to_hf_config(model.config, dtype=jnp.dtype(dtype).name)

    def fill(tmp: Path) -> None:
        shards: list[dict[str, np.ndarray]] = [{}]
        size = 0
        files: list[str] = []
        weight_map: dict[str, str] = {}
        total = 0

        def flush() -> None:
            name = f"model-{len(files) + 1:05d}.safetensors"
            write_safetensors(tmp / name, shards[-1])
            files.append(name)
            for key in shards[-1]:
                weight_map[key] = name
            shards.append({})

        for key, arr in _hf_tensors(model, np_dtype):
            if size and size + arr.nbytes > max_shard_bytes:
                flush()
                size = 0
            shards[-1][key] = arr
            size += arr.nbytes
            total += arr.nbytes
        flush()
        if len(files) == 1:
            os.replace(tmp / files[0], tmp / "model.safetensors")
        else:
            n = len(files)
            for j, old in enumerate(files):
                new = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
                os.replace(tmp / old, tmp / new)
                weight_map = {k: (new if v == old else v) for k, v in weight_map.items()}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(
                {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        if tokenizer is not None:
            if isinstance(tokenizer, (str, os.PathLike)):
                for fname in TOKENIZER_FILES:
                    src = Path(tokenizer) / fname
                    if src.exists() and not (tmp / fname).exists():
                        shutil.copyfile(src, tmp / fname)
            else:
                tokenizer.save_pretrained(tmp)
        if not (tmp / "generation_config.json").exists():
            gen = {k: hf_cfg.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
            (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2))

    fsutil.check_output_dir(path, overwrite=overwrite)  # on every process, before any gather
    if jax.process_index() == 0:
        info = {"writer": "save_hf", "model_type": hf_cfg.get("model_type"),
                "dtype": jnp.dtype(dtype).name}
        return fsutil.write_output_dir(path, fill, overwrite=overwrite, info=info)
    for _ in _hf_tensors(model, np_dtype):  # take part in the gathers
        pass
    return Path(path).expanduser().absolute()
