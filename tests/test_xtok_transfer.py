"""Tokenizer transfer: FVT rows against a float64 numpy reference on real tokenizer pairs,
specials by role, untied lm_heads, the identity transfer reproducing the teacher exactly, and
the ``transfer`` student init from a run config (built and rebuilt without weights)."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import assets, sharding
from distill_jax import models as M
from distill_jax.config import StudentConfig, load_run_config
from distill_jax.tokenizer import bytes_to_unicode, load_tokenizer
from distill_jax.train import assemble, build
from distill_jax.xtok.transfer import derived_config, fvt_embeddings, fvt_plan, transfer_model

REPO = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO / "configs" / "smollm2_to_mistral_tokenizer.tiny.yaml"
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-F]{2})>$")
# SmolLM2's special tokens: <|endoftext|> (unk), <|im_start|> (bos), <|im_end|> (eos, pad).
ENDOFTEXT, IM_START, IM_END = 0, 1, 2


@pytest.fixture(scope="module")
def smollm2_dir() -> Path:
    try:
        return assets.smollm2_hf_dir()
    except assets.AssetError as err:
        pytest.skip(f"SmolLM2 unavailable: {err}")


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def sentencepiece_like():
    """A small SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte fallback in the model
    vocabulary, ``<unk>``/``<s>``/``</s>``) trained here on the math data, plus chat tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rows = [json.loads(line) for line in (REPO / "configs/data/math_train.jsonl").read_text()
            .splitlines()[:300]]
    texts = [r["prompt"] + " " + r["response"] for r in rows]
    scratch = Tokenizer(models.BPE())
    scratch.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    scratch.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=500, show_progress=False))
    learned = json.loads(scratch.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for piece in sorted(learned["vocab"], key=learned["vocab"].get):
        vocab.setdefault(piece, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_end|>", "[INST]", "[/INST]"]})
    return fast


def _reference_rows(table_VD: np.ndarray, teacher, new,
                    vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 FVT of the new tokenizer's ordinary tokens, one token at a time: spell the piece
    (``▁`` -> space, ``<0xNN>`` -> byte), take the teacher's tokenization (a lone byte: the
    teacher's byte-level symbol for it), average. Returns the rows and which were computed."""
    table = table_VD.astype(np.float64)
    mean = table[:len(teacher)].mean(0)
    to_byte = bytes_to_unicode()
    vocab_of = teacher.get_vocab()
    specials = set(new.all_special_ids)
    out = np.tile(mean, (vocab, 1))
    done = np.zeros(vocab, bool)
    for i in range(len(new)):
        if i in specials:
            continue
        piece = new.convert_ids_to_tokens(i)
        m = _BYTE_FALLBACK.match(piece)
        if m:
            byte = int(m.group(1), 16)
            ids = [vocab_of[to_byte[byte]]] if to_byte[byte] in vocab_of else []
        else:
            ids = teacher.encode(piece.replace("▁", " "), add_special_tokens=False)
        if ids:
            out[i] = table[ids].mean(0)
        done[i] = True
    return out, done


# ----------------------------------------------------------------------------------------------
# FVT rows


def test_fvt_sentencepiece_like_against_float64_reference(smol, sentencepiece_like):
    new = sentencepiece_like
    rng = np.random.default_rng(0)
    table_VD = rng.standard_normal((len(smol), 8)).astype(np.float32)
    rows_VD, report = fvt_embeddings(table_VD, smol, new)
    rows_VD = np.asarray(rows_VD)
    assert rows_VD.shape == (len(new), 8) and rows_VD.dtype == np.float32

    ref_VD, done = _reference_rows(table_VD, smol, new, len(new))
    np.testing.assert_allclose(rows_VD[done], ref_VD[done], rtol=1e-6, atol=1e-6)

    # A piece that is exactly one teacher token gets exactly that row ("▁the" is SmolLM2's "Ġthe")
    the = new.convert_tokens_to_ids("▁the")
    np.testing.assert_array_equal(rows_VD[the], table_VD[smol.convert_tokens_to_ids("Ġthe")])
    # Several pieces are spelt by several teacher tokens: those rows are means.
    plan = fvt_plan(smol, new)
    multi = np.flatnonzero(plan.counts > 1)
    assert report.averaged == len(multi) > 0
    # Special tokens by string or role.
    by_role = {"<s>": IM_START, "</s>": IM_END, "<unk>": ENDOFTEXT, "<|im_end|>": IM_END,
               "[INST]": IM_START, "[/INST]": IM_END}
    for piece, teacher_id in by_role.items():
        np.testing.assert_array_equal(rows_VD[new.convert_tokens_to_ids(piece)],
                                      table_VD[teacher_id], err_msg=piece)
    assert report.special == len(by_role)
    # Invalid-UTF-8 bytes (<0x80>..) map to SmolLM2's byte symbols; some bytes it lacks default.
    assert report.copied + report.averaged + report.defaulted == len(new)
    assert report.copied == int((plan.counts == 1).sum()) and report.padding == 0


def test_fvt_sentencepiece_like_teacher_spells_exact_bytes(smol, sentencepiece_like):
    """A SentencePiece teacher tokenizes a lone piece with a dummy-prefix space; FVT must not:
    every new token's teacher pieces spell exactly its bytes."""
    teacher = sentencepiece_like
    plan = fvt_plan(teacher, smol)
    from_char = {c: b for b, c in bytes_to_unicode().items()}

    def teacher_bytes(i):
        piece = teacher.convert_ids_to_tokens(int(i))
        m = _BYTE_FALLBACK.match(piece)
        return bytes([int(m.group(1), 16)]) if m else piece.replace("▁", " ").encode()

    specials = set(smol.all_special_ids) | set(range(17))  # SmolLM2's added tokens are 0..16
    checked = 0
    for i in range(len(smol)):
        if i in specials or plan.counts[i] == 0:
            continue
        spelt = b"".join(teacher_bytes(t) for t in plan.teacher_ids[i, :plan.counts[i]])
        assert spelt == bytes(from_char[c] for c in smol.convert_ids_to_tokens(i)), i
        checked += 1
    assert checked > 0.99 * (len(smol) - len(specials))
    ing = smol.convert_tokens_to_ids("ing")
    assert b"".join(teacher_bytes(t) for t in plan.teacher_ids[ing, :plan.counts[ing]]) == b"ing"
    target = {"<|endoftext|>": "<unk>", "<|im_start|>": "<s>", "<|im_end|>": "<|im_end|>"}
    for piece, teacher_piece in target.items():
        i = smol.convert_tokens_to_ids(piece)
        assert plan.counts[i] == 1
        assert plan.teacher_ids[i, 0] == teacher.convert_tokens_to_ids(teacher_piece), piece


def test_fvt_byte_tokenizer(smol):
    new = load_tokenizer("bytes")
    rng = np.random.default_rng(1)
    table_VD = rng.standard_normal((len(smol), 4)).astype(np.float32)
    rows_VD, report = fvt_embeddings(table_VD, smol, new)
    rows_VD = np.asarray(rows_VD)
    assert rows_VD.shape == (259, 4)
    np.testing.assert_array_equal(rows_VD[:3], table_VD[[IM_END, IM_START, IM_END]])  # pad bos eos
    vocab = smol.get_vocab()
    mean = table_VD.astype(np.float64).mean(0)
    to_char = bytes_to_unicode()
    for b in range(256):
        teacher_id = vocab.get(to_char[b])
        if teacher_id is None:  # SmolLM2 has no token for this byte
            np.testing.assert_allclose(rows_VD[b + 3], mean, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(rows_VD[b + 3], table_VD[teacher_id])
    missing = sum(to_char[b] not in vocab for b in range(256))
    assert (report.copied, report.averaged, report.defaulted) == (259 - missing, 0, missing)
    assert report.special == 3


def test_fvt_identity_on_49k_vocab_and_padding(smol):
    rng = np.random.default_rng(2)
    table_VD = rng.standard_normal((len(smol), 16)).astype(np.float32)
    start = time.perf_counter()
    rows_VD, report = fvt_embeddings(table_VD, smol, smol, new_vocab_size=len(smol) + 64)
    seconds = time.perf_counter() - start
    print(f"FVT of a {len(smol)}-token vocabulary: {seconds:.2f} s; {report.summary()}")
    rows_VD = np.asarray(rows_VD)
    np.testing.assert_array_equal(rows_VD[:len(smol)], table_VD)
    np.testing.assert_allclose(rows_VD[len(smol):], np.tile(table_VD.astype(np.float64).mean(0),
                                                            (64, 1)), rtol=1e-6, atol=1e-6)
    assert (report.copied, report.averaged, report.defaulted, report.padding) == \
        (len(smol), 0, 64, 64)
    with pytest.raises(ValueError, match="smaller than the new tokenizer"):
        fvt_plan(smol, smol, new_vocab_size=100)


# ----------------------------------------------------------------------------------------------
# The transferred model


def _tiny_teacher(vocab: int, mesh, *, tied: bool, seed: int = 0) -> M.Model:
    cfg = M.ModelConfig.tiny("llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
                             num_layers=2, num_heads=2, num_kv_heads=1, head_dim=16,
                             tie_word_embeddings=tied, bos_token_id=IM_START,
                             eos_token_id=IM_END, pad_token_id=IM_END)
    return M.init(cfg, seed, mesh=mesh)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_identity_transfer_reproduces_teacher_logits(smol, devices8, tied):
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=devices8)
    teacher = _tiny_teacher(len(smol), mesh, tied=tied)
    student = transfer_model(teacher, smol, smol, mesh=mesh)
    assert student.config == teacher.config
    expected = M.param_shardings(student.config, mesh)
    for got, want in zip(jax.tree.leaves(student.params), jax.tree.leaves(expected)):
        assert got.sharding.is_equivalent_to(want, got.ndim)
    tokens = np.random.default_rng(3).integers(0, len(smol), (4, 12))
    forward = jax.jit(M.forward)
    np.testing.assert_array_equal(np.asarray(forward(student, tokens)),
                                  np.asarray(forward(teacher, tokens)))


def test_transfer_untied_lm_head_columns_and_layers(smol, sentencepiece_like, devices8):
    new = sentencepiece_like
    mesh = sharding.make_mesh(devices=devices8[:1])
    teacher = _tiny_teacher(len(smol), mesh, tied=False, seed=4)
    student = transfer_model(teacher, smol, new, layers=(1,), mesh=mesh, dtype="bfloat16")
    cfg = student.config
    assert (cfg.vocab_size, cfg.num_layers, cfg.dtype) == (len(new), 1, "bfloat16")
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, None)
    np.testing.assert_array_equal(np.asarray(student.params["layers"]["mlp"]["up"][0]),
                                  np.asarray(teacher.params["layers"]["mlp"]["up"][1]))
    np.testing.assert_array_equal(np.asarray(student.params["final_norm"]["scale"]),
                                  np.asarray(teacher.params["final_norm"]["scale"]))
    head_DV = np.asarray(teacher.params["lm_head"])
    embed_VD = np.asarray(teacher.params["embed"])
    ref_head_VD, done = _reference_rows(head_DV.T, smol, new, len(new))
    ref_embed_VD, _ = _reference_rows(embed_VD, smol, new, len(new))
    np.testing.assert_allclose(np.asarray(student.params["lm_head"]).T[done], ref_head_VD[done],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(student.params["embed"])[done], ref_embed_VD[done],
                               rtol=1e-6, atol=1e-7)
    eos = new.convert_tokens_to_ids("</s>")
    np.testing.assert_array_equal(np.asarray(student.params["lm_head"])[:, eos], head_DV[:, IM_END])
    # The student runs on its own tokens, and a new token's logit is the mean of its pieces'
    # teacher logits (same hidden state): the output scale is the teacher's.
    text = "Each member gets 940 / 5 = $188."
    ids = np.asarray([new.encode(text)])
    logits = np.asarray(jax.jit(M.forward)(student, ids))
    assert logits.shape == (1, ids.shape[1], len(new)) and np.isfinite(logits).all()
    h = np.asarray(jax.jit(M.hidden_states)(student, ids), np.float64)[0, -1]
    plan = fvt_plan(smol, new)
    j = int(np.flatnonzero(plan.counts > 1)[0])
    pieces = plan.teacher_ids[j, :plan.counts[j]]
    np.testing.assert_allclose(h @ np.asarray(student.params["lm_head"], np.float64)[:, j],
                               (h @ head_DV[:, pieces].astype(np.float64)).mean(), rtol=1e-5)


def test_derived_config_checks():
    cfg = M.ModelConfig.tiny("gemma2", num_layers=4)
    kept = derived_config(cfg, layers=(0, 3))
    assert kept.num_layers == 2 and kept.layer_types == (cfg.layer_types[0], cfg.layer_types[3])
    assert derived_config(cfg) == cfg
    with pytest.raises(ValueError, match="out of range"):
        derived_config(cfg, layers=(0, 7))
    new = load_tokenizer("bytes")
    assert derived_config(cfg, new_tokenizer=new, vocab_size=320).vocab_size == 320
    with pytest.raises(ValueError, match="smaller than the new tokenizer"):
        derived_config(cfg, new_tokenizer=new, vocab_size=200)


# ----------------------------------------------------------------------------------------------
# The student init from a run config


def test_build_student_transfer_matches_export_config(smollm2_dir, devices8):
    cfg = load_run_config(TINY_CONFIG, [f"teacher.tokenizer={smollm2_dir}"])
    assert cfg.student.init == "transfer" and cfg.tokenizer == "bytes"
    mesh = sharding.make_mesh(devices=devices8[:2])
    teacher = build.load_model(cfg.teacher, mesh)
    student = assemble.build_student(cfg.student, teacher, mesh, student_tokenizer=cfg.tokenizer,
                                  teacher_tokenizer=str(smollm2_dir))
    assert student.config == assemble.student_config(cfg)
    assert student.config.vocab_size == 259
    assert student.config.num_layers == teacher.config.num_layers
    shapes = jax.tree.map(lambda s: s.shape, M.param_shapes(student.config))
    assert jax.tree.map(lambda x: x.shape, student.params) == shapes
    with pytest.raises(ValueError, match="student_tokenizer= and teacher_tokenizer="):
        assemble.build_student(cfg.student, teacher, mesh)


def test_teacher_layers_empty_means_all(devices8):
    mesh = sharding.make_mesh(devices=devices8[:1])
    teacher = _tiny_teacher(64, mesh, tied=True)
    student = assemble.build_student(StudentConfig(init="teacher_layers"), teacher, mesh)
    assert student.config == teacher.config
    for a, b in zip(jax.tree.leaves(student.params), jax.tree.leaves(teacher.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    src = dataclasses.replace(StudentConfig(init="teacher_layers"), layers=(1,))
    assert assemble.build_student(src, teacher, mesh).config.num_layers == 1
