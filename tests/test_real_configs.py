"""Real published ``config.json`` files (tests/fixtures/hf_configs, sources in its README.md).

Each file loads as published and as transformers 5 re-saves it, agreeing with transformers'
own reading of it; a copy shrunk only in size (every other field as published) gives the
logits of transformers (fp32, random weights); and a field that would change the computation
in a way distill-jax does not implement is still refused, naming the field.
"""

import copy
import json
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from test_models import TOKENS, TOL, _forward, _hf_logits, _hf_model

from distill_jax import models as M
from distill_jax.models.config import FAMILIES

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf_configs"
NAMES = sorted(p.stem for p in FIXTURES.glob("*.json"))
HEAD_DIM = 16  # the shrunk head size
VOCAB = 97  # TOKENS are below this


def _published(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _hf_config(hf: dict):
    return transformers.CONFIG_MAPPING[hf["model_type"]].from_dict(copy.deepcopy(hf))


def _resaved(hf: dict, tmp_path: pathlib.Path) -> dict:
    """The config.json transformers writes after loading ``hf`` (a re-saved checkpoint's)."""
    _hf_config(hf).save_pretrained(tmp_path)
    return json.loads((tmp_path / "config.json").read_text())


def test_fixtures_cover_every_family():
    assert len(NAMES) >= 19
    assert {_published(n)["model_type"] for n in NAMES} == set(FAMILIES)


@pytest.mark.parametrize("form", ["published", "resaved"])
@pytest.mark.parametrize("name", NAMES)
def test_loads_as_transformers_reads_it(name, form, tmp_path):
    hf = _published(name)
    if form == "resaved":
        hf = _resaved(hf, tmp_path)
    cfg = M.from_hf_config(hf)
    ref = _hf_config(hf)
    assert cfg.family == ref.model_type
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
        ref.vocab_size, ref.hidden_size, ref.intermediate_size, ref.num_hidden_layers)
    assert (cfg.num_heads, cfg.num_kv_heads) == (ref.num_attention_heads, ref.num_key_value_heads)
    assert cfg.head_dim == (getattr(ref, "head_dim", None) or ref.hidden_size // ref.num_attention_heads)
    assert cfg.tie_word_embeddings == ref.tie_word_embeddings
    assert cfg.rms_norm_eps == ref.rms_norm_eps
    rope = ref.rope_parameters
    if cfg.family == "gemma3_text":
        assert cfg.local_rope_theta == rope["sliding_attention"]["rope_theta"]
        rope = rope["full_attention"]
    assert cfg.rope_theta == rope["rope_theta"]
    assert (cfg.rope_scaling.kind if cfg.rope_scaling else "default") == rope["rope_type"]
    if cfg.family.startswith("gemma"):
        names = {"full_attention": "full", "sliding_attention": "sliding"}
        assert cfg.layer_types == tuple(names[t] for t in ref.layer_types)
        assert cfg.sliding_window == ref.sliding_window
        assert cfg.attn_scale == ref.query_pre_attn_scalar ** -0.5
        assert cfg.final_logit_softcap == ref.final_logit_softcapping
        assert cfg.attn_logit_softcap == ref.attn_logit_softcapping
    else:
        assert set(cfg.layer_types) == {"full"}


@pytest.mark.parametrize("name", NAMES)
def test_resaved_form_gives_the_same_model(name, tmp_path):
    hf = _published(name)
    assert M.from_hf_config(_resaved(hf, tmp_path)) == M.from_hf_config(hf)


def _shrunk(hf: dict) -> dict:
    """``hf`` with fewer layers, heads, channels and tokens, in the published proportions.

    The grouping of query heads per key/value head, hidden size to attention width, MLP width
    to hidden size and query scalar to head size keep their published ratios; windows become
    shorter than the test sequence so sliding layers differ from full ones. Every other field
    (rope scaling, softcaps, biases, norms, metadata) stays as published.
    """
    d = copy.deepcopy(hf)
    heads = d["num_attention_heads"]
    kv = d.get("num_key_value_heads") or heads
    head_dim = d.get("head_dim") or d["hidden_size"] // heads
    new_kv = min(kv, 2)
    new_heads = new_kv * (heads // kv)
    per_head = round(d["hidden_size"] / (heads * head_dim) * HEAD_DIM)
    hidden = new_heads * per_head
    layers = 6 if d["model_type"] == "gemma3_text" else 3  # gemma3: one 5-sliding-1-full period
    d.update(vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=new_heads,
             num_key_value_heads=new_kv, num_hidden_layers=layers,
             intermediate_size=round(hidden * d["intermediate_size"] / d["hidden_size"]))
    if "head_dim" in hf:
        d["head_dim"] = HEAD_DIM
    if d.get("query_pre_attn_scalar"):
        d["query_pre_attn_scalar"] = d["query_pre_attn_scalar"] * HEAD_DIM // head_dim
    for key in ("sliding_window", "sliding_window_size"):
        if isinstance(d.get(key), int):
            d[key] = 6
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:layers]
    return d


@pytest.mark.parametrize("name", NAMES)
def test_shrunk_config_matches_transformers(name, tmp_path):
    hf = _shrunk(_published(name))
    hm = _hf_model(hf["model_type"], hf)
    hm.save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(hf))  # the published form, not transformers'
    model = M.load_hf(tmp_path)
    assert model.config.num_layers == hf["num_hidden_layers"]
    ours = np.asarray(_forward(model, jnp.asarray(TOKENS)))
    ref = _hf_logits(hm, TOKENS)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= TOL, np.abs(ours - ref).max()


# Values transformers (or the tool that wrote the file) would act on and distill-jax does not
# implement: each must still be refused with a message naming the field and the value.
REFUSED = [
    ("smollm2-135m", {"rope_interleaved": True}, "rope_interleaved=True"),
    ("qwen2.5-7b", {"use_mrope": True}, "use_mrope=True"),
    ("llama-3.2-1b", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("gemma-3-270m", {"use_bidirectional_attention": True}, "use_bidirectional_attention=True"),
    ("qwen3-0.6b", {"use_sliding_window": True}, "use_sliding_window=True"),
    ("qwen2.5-0.5b", {"layer_types": ["sliding_attention"] * 24}, "layer_types"),
    ("qwen2.5-0.5b", {"mlp_bias": True}, "mlp_bias=True"),
    ("gemma-2-9b", {"sliding_window_size": 2048}, "sliding_window_size=2048"),
    ("llama-3.2-1b", {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                       "beta_fast": 32}}, "beta_fast"),
    ("llama-3.2-1b", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
]


@pytest.mark.parametrize("name,change,message", REFUSED, ids=[f"{n}-{m}" for n, _, m in REFUSED])
def test_computation_changing_values_are_refused(name, change, message):
    hf = {**_published(name), **change}
    with pytest.raises(M.ConfigError, match=message) as err:
        M.from_hf_config(hf)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-7b", "qwen3-0.6b",
                                  "gemma-2-9b", "gemma-3-1b-it"])
def test_unknown_field_is_refused_by_name_alone(name):
    """An unknown field raises naming that field, not the inert metadata beside it."""
    hf = {**_published(name), "attn_magic_factor": 3}
    with pytest.raises(M.ConfigError, match="attn_magic_factor") as err:
        M.from_hf_config(hf)
    inert = {"is_llama_config", "rope_interleaved", "transformers.js_config", "use_mrope",
             "sliding_window_size", "cache_implementation", "unk_token_id"}
    assert not [k for k in inert if k in str(err.value)], str(err.value)


@pytest.mark.parametrize("extra", [{"unk_token_id": 0}, {"is_qwen2_config": True},
                                   {"rope_interleaved": False}, {"use_mrope": False},
                                   {"use_bidirectional_attention": False},
                                   {"pretraining_tp": 4}, {"num_beams": 4, "temperature": 0.7}])
def test_inert_metadata_is_accepted(extra):
    base = _published("llama-3.1-8b")
    assert M.from_hf_config({**base, **extra}) == M.from_hf_config(base)
