"""KV-cache decoding: cached == uncached, greedy == transformers, EOS stops, seeded sampling."""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distill_jax.models as dm
from distill_jax.models import ModelConfig

# The module (``distill_jax.models.generate`` the attribute is the function it exports).
gen = importlib.import_module("distill_jax.models.generate")

jax.config.update("jax_default_matmul_precision", "highest")

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text")
# Gemma configs get a window of 5 so the sequences below (up to 17 tokens) exceed it, and a
# full-attention layer next to a sliding one (gemma3: local and global rope bases).
_FAMILY_OVERRIDES = {
    "gemma2": dict(sliding_window=5),
    "gemma3_text": dict(sliding_window=5, layer_types=("sliding", "full")),
}


def _perturbed(model: dm.Model, seed: int, std: float = 0.1) -> dm.Model:
    """Add normal(0, std) noise to every parameter (norm scales and biases included).

    Done in numpy: eager JAX would compile one small program per parameter shape.
    """
    rng = np.random.default_rng(seed)
    return model.replace(params=jax.tree.map(
        lambda x: jnp.asarray(np.asarray(x) + rng.normal(0.0, std, x.shape), x.dtype),
        model.params))


def _tiny(family: str, seed: int = 0) -> dm.Model:
    """``ModelConfig.tiny(family)`` with every parameter = its init constant + normal(0, 0.1).

    Norm scales start at 1 (0 for Gemma's 1 + w), everything else at 0 plus the noise, which
    is what ``dm.init`` followed by the perturbation gives up to the init's std of 0.02. Built
    in numpy from ``dm.param_shapes`` because ``dm.init``'s jitted random init takes 4-8 s to
    compile per config on CPU, more than the rest of a family's test.
    """
    cfg = ModelConfig.tiny(family, vocab_size=128, **_FAMILY_OVERRIDES.get(family, {}))

    def value(path, shape):
        one = path[-1].key == "scale" and not cfg.gemma_norm
        return np.full(shape.shape, 1.0 if one else 0.0, shape.dtype)

    params = jax.tree_util.tree_map_with_path(value, dm.param_shapes(cfg))
    return _perturbed(dm.Model(cfg, params), seed)


@pytest.fixture(scope="module")
def llama():
    return _tiny("llama", seed=1)


_forward = jax.jit(dm.forward)


# ----------------------------------------------------------------------------- 1. cache == forward
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_decoding_matches_forward(family):
    """Prefill + one-token steps of a left-padded batch == forward on each unpadded row."""
    model = _tiny(family)
    rng = np.random.default_rng(0)
    # Every row has 17 tokens (more than the window of 5) split into a prompt of its own
    # length and a continuation fed one token per decode step; all rows are left-padded.
    total, prompt_lens, p = 17, np.asarray([4, 9, 1]), 12
    seqs = rng.integers(0, 128, (3, total))
    tokens = rng.integers(0, 128, (3, p))  # random pad tokens: they must not matter
    for i, n in enumerate(prompt_lens):
        tokens[i, p - n:] = seqs[i, :n]
    n_dec = total - prompt_lens.min()
    cache = gen.init_cache(model, 3, p + n_dec)
    assert cache["k"].shape == (2, 3, p + n_dec, 2, 16) and cache["k"].dtype == jnp.float32
    logits_BPV, cache = jax.jit(gen.prefill, static_argnames="all_logits")(
        model, tokens, prompt_lens, cache, all_logits=True)
    logits_BPV = np.asarray(logits_BPV)  # (indexing jax arrays eagerly compiles each slice)
    got = np.full((3, total, 128), np.nan, np.float32)
    for i, n in enumerate(prompt_lens):
        got[i, :n] = logits_BPV[i, p - n:]
    step = jax.jit(gen.decode_step)
    for j in range(n_dec):
        pos = prompt_lens + j
        toks = seqs[np.arange(3), np.minimum(pos, total - 1)]  # rows past the end: any token
        logits_BV, cache = step(model, toks, pos, cache)
        logits_BV = np.asarray(logits_BV)
        for i in np.flatnonzero(pos < total):
            got[i, pos[i]] = logits_BV[i]
    assert int(cache["index"]) == p + n_dec
    ref = np.asarray(_forward(model, seqs))  # three unpadded rows, no segment ids
    diff = np.abs(got - ref).max(axis=(1, 2))
    assert (diff <= 1e-5).all(), f"{family}: max |cached - forward| per row = {diff}"


# ----------------------------------------------------------------------------- 2. greedy == HF
def _hf_model(family: str, tmpdir: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  max_position_embeddings=256)
    if family == "llama":
        hf_cfg = transformers.LlamaConfig(**common)
    else:
        hf_cfg = transformers.Gemma2Config(**common, sliding_window=5, query_pre_attn_scalar=16)
    hm = transformers.AutoModelForCausalLM.from_config(
        hf_cfg, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        for prm in hm.parameters():
            prm.add_(torch.randn_like(prm) * 0.1)
        if family == "gemma2":
            # Tied, sqrt(d)-scaled embeddings dominate the residual stream, so greedy decoding
            # of a random Gemma mostly repeats its input token; shrink them for varied outputs.
            hm.model.embed_tokens.weight.mul_(0.3)
    hm.save_pretrained(tmpdir)
    return hm, dm.load_hf(tmpdir)


def _hf_greedy(hm, prompt, max_new_tokens, eos):
    import torch

    hm.generation_config.eos_token_id = eos
    ids = torch.tensor([prompt])
    out = hm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_greedy_matches_transformers(family, tmp_path):
    hm, model = _hf_model(family, str(tmp_path))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 97, n).tolist() for n in (5, 13, 1, 8)]
    n_new = 14
    expected = [_hf_greedy(hm, pr, n_new, None) for pr in prompts]
    assert len({t for e in expected for t in e}) >= 10  # not one repeated token
    out = dm.generate(model, prompts, max_new_tokens=n_new, eos_ids=(), prompt_bucket=8)
    assert out.sequences == expected
    assert out.lengths.tolist() == [n_new] * 4 and out.num_steps == n_new
    assert not out.finished.any()

    # Stop the same way: an EOS id that some row produces part-way through.
    eos = next(t for t in expected[0][2:] if any(t not in e for e in expected[1:]))
    expected_eos = [_hf_greedy(hm, pr, n_new, eos) for pr in prompts]
    assert any(len(e) < n_new for e in expected_eos)
    out = gen.generate(model, prompts, max_new_tokens=n_new, eos_ids=eos, prompt_bucket=8)
    assert out.sequences == expected_eos
    assert out.finished.tolist() == [eos in e for e in expected]


# ----------------------------------------------------------------------------- 3. EOS
# The llama tests below share one batch size (3) and max_new_tokens (12), hence one compile
# per sampling mode: the EOS set, pad id, temperature, top_p value and seed are traced.
N_NEW = 12


def _prompts(seed: int, lengths=(5, 11, 20)) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 128, n).tolist() for n in lengths]


def test_eos_stops_rows_independently(llama):
    prompts = _prompts(2)
    free = gen.generate(llama, prompts, max_new_tokens=N_NEW, eos_ids=())
    assert free.num_steps == N_NEW and free.lengths.tolist() == [N_NEW] * 3
    assert not free.finished.any()
    # An EOS id that some row first emits part-way (not at the first or last step) and
    # that another row never emits.
    seqs = free.sequences
    eos = next(t for s in seqs for j, t in enumerate(s[:-1])
               if j > 0 and t not in s[:j] and any(t not in o for o in seqs))
    out = gen.generate(llama, prompts, max_new_tokens=N_NEW, eos_ids=[eos, 100_000], pad_id=-7)
    for i, s in enumerate(seqs):
        n = s.index(eos) + 1 if eos in s else N_NEW
        assert out.sequences[i] == s[:n]  # EOS included, nothing after it
        assert out.lengths[i] == n and out.finished[i] == (eos in s)
        assert out.tokens[i, :n].tolist() == s[:n] and (out.tokens[i, n:] == -7).all()
    assert ((1 < out.lengths) & (out.lengths < N_NEW)).any() and out.lengths.max() == N_NEW
    assert out.num_steps == N_NEW

    # When every row has stopped, the loop exits early.
    stops = [s[0] for s in seqs] + [s[1] for s in seqs]
    out = gen.generate(llama, prompts, max_new_tokens=N_NEW, eos_ids=stops)
    assert out.finished.all() and out.num_steps == out.lengths.max() <= 2
    # The default EOS set is the config's.
    cfg_eos = llama.replace(config=llama.config.replace(eos_token_id=seqs[0][0]))
    assert gen.generate(cfg_eos, prompts, max_new_tokens=N_NEW).sequences[0] == seqs[0][:1]


def test_prompt_forms_and_compile_reuse(llama):
    prompts = _prompts(3, (7, 2, 30))
    ref = gen.generate(llama, prompts, max_new_tokens=N_NEW, eos_ids=())
    lens = np.asarray([len(pr) for pr in prompts])
    right = np.zeros((3, 30), np.int32)
    left = np.zeros((3, 30), np.int32)
    for i, pr in enumerate(prompts):
        right[i, :len(pr)] = pr
        left[i, 30 - len(pr):] = pr
    mask = np.arange(30)[None] < lens[:, None]
    for arr, kw in ((right, dict(lengths=lens, padding_side="right")),
                    (left, dict(lengths=lens)), (right, dict(mask=mask))):
        out = gen.generate(llama, arr, max_new_tokens=N_NEW, eos_ids=(), **kw)
        assert out.sequences == ref.sequences, kw
    # Other prompt lengths in the same 64-token bucket, and other EOS and pad ids, reuse the
    # compiled function.
    size = gen._generate_jit._cache_size()
    gen.generate(llama, _prompts(4, (50, 1, 64)), max_new_tokens=N_NEW, eos_ids=(3, 4), pad_id=9)
    assert gen._generate_jit._cache_size() == size
    with pytest.raises(ValueError, match="empty"):
        gen.generate(llama, [[1, 2], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        gen.generate(llama, [[1, 128]], max_new_tokens=2)
    assert gen.generate(llama, prompts, max_new_tokens=0).sequences == [[], [], []]


# ----------------------------------------------------------------------------- 4. sampling
def test_sampling_seeded_in_top_k_and_reduces_to_greedy(llama):
    prompts = _prompts(5, (4, 5, 2))  # with N_NEW, at most 17 tokens: forward's shape above
    kw = dict(max_new_tokens=N_NEW, eos_ids=())
    greedy = gen.generate(llama, prompts, **kw).sequences
    k = 3
    a = gen.generate(llama, prompts, temperature=5.0, top_k=k, seed=1, **kw).sequences
    b = gen.generate(llama, prompts, temperature=5.0, top_k=k, seed=1, **kw).sequences
    c = gen.generate(llama, prompts, temperature=5.0, top_k=k, seed=2, **kw).sequences
    assert a == b and a != c and a != greedy

    # Every sampled token is among the k most likely under the model's own (uncached) logits.
    lens = [len(pr) + N_NEW for pr in prompts]
    full = np.zeros((3, max(lens)), np.int32)
    for i, (pr, seq) in enumerate(zip(prompts, a)):
        full[i, :lens[i]] = pr + seq
    logits = np.asarray(_forward(llama, full))  # right padding cannot affect earlier positions
    ranks = [int((logits[i, len(pr) - 1 + j] > logits[i, len(pr) - 1 + j, tok]).sum())
             for i, (pr, seq) in enumerate(zip(prompts, a)) for j, tok in enumerate(seq)]
    assert max(ranks) < k and len(set(ranks)) > 1, ranks

    assert gen.generate(llama, prompts, temperature=1.5, top_k=1, seed=3, **kw).sequences == greedy
    assert gen.generate(llama, prompts, temperature=1.5, top_p=1e-6, seed=3,
                        **kw).sequences == greedy


def test_sample_tokens_distribution():
    """Empirical frequencies match the filtered, tempered softmax (5-sigma bounds)."""
    v, n = 12, 20000
    x = np.random.default_rng(6).normal(0, 2, v)
    logits = jnp.asarray(np.broadcast_to(x, (n, v)), jnp.float32)  # n rows, one draw each

    settings = (dict(temperature=1.0), dict(temperature=0.7, top_k=4),
                dict(temperature=1.3, top_p=0.8), dict(temperature=2.0, top_k=6, top_p=0.7),
                dict())  # the last is greedy

    @jax.jit
    def draw_all(logits, key):
        return [gen.sample_tokens(logits, jax.random.fold_in(key, i), **kw)
                for i, kw in enumerate(settings)]

    draws = [np.asarray(d) for d in draw_all(logits, jax.random.key(0))]
    order = np.argsort(-x)

    def expected(temperature, top_k=None, top_p=None):
        z = x / temperature
        keep = np.zeros(v, bool)
        keep[order[:top_k or v]] = True
        p = np.where(keep, np.exp(z - z.max()), 0.0)
        p /= p.sum()
        if top_p is not None:  # smallest most-likely set whose mass reaches top_p
            before = np.cumsum(p[order]) - p[order]
            keep[order[before >= top_p]] = False
            p = np.where(keep, p, 0.0)
            p /= p.sum()
        return p

    for kw, draw in zip(settings[:-1], draws):
        p, f = expected(**kw), np.bincount(draw, minlength=v) / n
        assert (f[p == 0] == 0).all(), kw  # never outside the top-k / nucleus set
        assert ((p > 0) & (p < 1)).sum() >= 3, kw  # the filters leave a real choice
        bound = 5 * np.sqrt(p * (1 - p) / n)
        assert (np.abs(f - p) <= bound).all(), (kw, f, p)
    assert (draws[-1] == order[0]).all()


# ----------------------------------------------------------------------------- generate_text
def test_generate_text_with_chat_template(llama):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<user>", "<bot>"] + [f"w{i}" for i in range(124)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    hf_tok.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                            "{% if add_generation_prompt %}<bot>{% endif %}")
    texts = ["w5 w6 w7", "w100", "w1 w2"]
    got = gen.generate_text(llama, hf_tok, texts, chat_template=True, max_new_tokens=N_NEW)
    ids = [[2, 9, 10, 11, 3], [2, 104, 3], [2, 5, 6, 3]]
    out = gen.generate(llama, ids, max_new_tokens=N_NEW, eos_ids=(1,), pad_id=0)
    assert got == [hf_tok.decode(s, skip_special_tokens=True) for s in out.sequences]
    assert gen.generate_text(llama, hf_tok, "w5 w6 w7", max_new_tokens=0) == ""  # one text
    plain = gen.generate(llama, [[9, 10, 11], [104], [5, 6]], max_new_tokens=N_NEW, eos_ids=(1,))
    assert gen.generate_text(llama, hf_tok, texts, max_new_tokens=N_NEW) == [
        hf_tok.decode(s, skip_special_tokens=True) for s in plain.sequences]
