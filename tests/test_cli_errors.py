"""Every error a user's input causes reaches them as one line naming the problem, never a
traceback: a table of bad inputs over the subcommands, run in-process through ``cli.main``
(and a few as real subprocesses, where interpreter-exit noise would show)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distill_jax import cli

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.yaml")
TINYX = str(REPO / "configs" / "tiny_xtok.yaml")
FAST = ["steps=1", "checkpoint.every=1", "logging.progress=false", "data.max_records=16"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Bad inputs on disk: data files, a run directory, a non-GGUF file, ..."""
    d = tmp_path_factory.mktemp("bad")
    good = [json.dumps({"prompt": f"{i} + 1?", "response": f"{i + 1}"}) for i in range(8)]
    (d / "bad_record.jsonl").write_text("\n".join(good[:2] + ['{"prompt": "x"'] + good[2:]) + "\n")
    (d / "all_bad.jsonl").write_text('{"prompt": 1}\n{"nope": 2}\nnot json\n')
    (d / "empty_docs.jsonl").write_text("\n".join(json.dumps({"text": ""}) for _ in range(5)) + "\n")
    (d / "a_file").write_text("just text\n")
    (d / "not.gguf").write_bytes(b"definitely not gguf" * 10)
    (d / "list.yaml").write_text("- 1\n- 2\n")
    (d / "broken.yaml").write_text("steps: [1, 2\n")
    (d / "nodata_dir").mkdir()
    (d / "hf_without_config").mkdir()
    (d / "fake_run").mkdir()
    from distill_jax.config import dump_run_config, load_run_config
    (d / "fake_run" / "config.yaml").write_text(dump_run_config(load_run_config(TINY)))
    return d


def _run(argv, capsys):
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# (id, argv built from the files fixture, words the one-line message must contain)
CASES = [
    ("config-missing", lambda d: ["train", d / "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("config-is-dir", lambda d: ["train", d], ["is a directory", "YAML file"]),
    ("config-bad-yaml", lambda d: ["train", d / "broken.yaml"], ["broken.yaml", "not valid YAML"]),
    ("config-not-mapping", lambda d: ["train", d / "list.yaml"], ["list.yaml", "mapping"]),
    ("unknown-key", lambda d: ["train", TINY, "loss.temprature=2"], ["did you mean 'temperature'"]),
    ("override-no-equals", lambda d: ["train", TINY, "steps"], ["'steps'", "key.sub=value"]),
    ("steps-zero", lambda d: ["train", TINY, "steps=0"], ["steps must be >= 1"]),
    ("logging-every-zero", lambda d: ["train", TINY, "logging.every=0"], ["logging.every", ">= 1"]),
    ("model-override-typo", lambda d: ["train", TINY, "student.overrides.num_layer=2"],
     ["overrides.'num_layer'", "did you mean 'num_layers'"]),
    ("all-weights-zero", lambda d: ["train", TINY, "loss.terms={forward_kl: 0, cross_entropy: 0}"],
     ["non-zero weight"]),
    ("unknown-preset", lambda d: ["train", TINY, "student.preset=tiny-lama"], ["lama", "llama"]),
    ("data-missing", lambda d: ["train", TINY, f"run_dir={d / 'r_missing'}", f"data.sources=[{{path: {d / 'nope.jsonl'}}}]"],
     ["nope.jsonl", "does not exist"]),
    ("data-dir-empty", lambda d: ["train", TINY, f"run_dir={d / 'r_missing'}", f"data.sources=[{{path: {d / 'nodata_dir'}}}]"],
     ["nodata_dir", "matches no data files"]),
    ("data-under-a-file", lambda d: ["train", TINY, f"run_dir={d / 'r_missing'}", f"data.sources=[{{path: {d / 'a_file' / 'x.jsonl'}}}]"],
     ["x.jsonl", "does not exist"]),
    ("tokenizer-unknown", lambda d: ["train", TINY, f"run_dir={d / 'r_missing'}", "tokenizer=byts"], ["byts", "neither a name"]),
    ("bad-record", lambda d: ["train", TINY, f"data.sources=[{{path: {d / 'bad_record.jsonl'}}}]",
                              f"run_dir={d / 'r_bad'}", *FAST],
     ["bad_record.jsonl", "record 2", "on_bad_record=skip"]),
    ("skip-all-bad", lambda d: ["train", TINY, f"data.sources=[{{path: {d / 'all_bad.jsonl'}}}]",
                                "data.on_bad_record=skip", "data.num_epochs=2", f"run_dir={d / 'r_skip'}",
                                *FAST],
     ["no valid record", "all_bad.jsonl", "3 of 3 skipped"]),
    ("all-empty-docs", lambda d: ["train", TINY, f"data.sources=[{{path: {d / 'empty_docs.jsonl'}}}]",
                                  "data.record=text", "data.num_epochs=2", f"run_dir={d / 'r_empty'}",
                                  *FAST],
     ["empty_docs.jsonl", "no document", "token to train on"]),
    ("run-dir-is-file", lambda d: ["train", TINY, f"run_dir={d / 'a_file'}", *FAST], ["a_file"]),
    ("teacher-cache-missing", lambda d: ["train", TINY, f"teacher.cache={d / 'no_cache'}",
                                         f"run_dir={d / 'r_cache'}", *FAST], ["no_cache"]),
    ("teacher-cache-is-file", lambda d: ["train", TINY, f"teacher.cache={d / 'a_file'}",
                                         f"run_dir={d / 'r_cache2'}", *FAST], ["a_file"]),
    ("lr-negative", lambda d: ["train", TINY, "optimizer.lr=-1"], ["optimizer.lr"]),
    ("cache-without-dir", lambda d: ["cache", TINYX, *FAST], ["set teacher.cache"]),
    ("cache-verify-usage", lambda d: ["cache", "verify"], ["usage: distill-jax cache verify DIR"]),
    ("eval-nothing", lambda d: ["eval", TINY, "eval.sources=[]", "eval.math=null",
                                f"run_dir={d / 'r_eval'}"], ["no eval data configured", "eval.sources"]),
    ("eval-math-missing", lambda d: ["eval", TINY, f"eval.math={d / 'nope_math.jsonl'}", "eval.sources=[]",
                                     f"run_dir={d / 'r_eval'}"], ["nope_math.jsonl"]),
    ("eval-bad-models", lambda d: ["eval", TINY, "--models", "studnt"], ["studnt"]),
    ("export-not-a-run", lambda d: ["export", d / "nodata_dir", d / "out"], ["not a distill-jax run directory"]),
    ("export-run-is-file", lambda d: ["export", d / "a_file", d / "out"], ["a_file"]),
    ("export-no-checkpoint", lambda d: ["export", d / "fake_run", d / "out"], ["fake_run"]),
    ("generate-missing", lambda d: ["generate", d / "no_model", "--prompt", "hi"], ["no_model"]),
    ("generate-no-config", lambda d: ["generate", d / "hf_without_config", "--prompt", "hi"],
     ["config.json"]),
    ("gguf-missing", lambda d: ["convert-gguf", d / "no.gguf", d / "out"], ["no.gguf"]),
    ("gguf-not-gguf", lambda d: ["convert-gguf", d / "not.gguf", d / "out"], ["not.gguf"]),
    ("mathgen-out-dir", lambda d: ["mathgen", "--n", "2", "--out", d / "nodata_dir"], ["nodata_dir"]),
    ("data-check-missing", lambda d: ["data", "check", TINY, f"data.sources=[{{path: {d / 'nope.jsonl'}}}]"],
     ["nope.jsonl", "does not exist"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line(case, files, capsys, monkeypatch):
    name, argv, words = case
    monkeypatch.delenv("DISTILL_JAX_DEBUG", raising=False)
    monkeypatch.chdir(files)  # default run directories land in the temporary directory
    rc, out, err = _run(argv(files), capsys)
    assert rc == 2, (rc, err[-2000:])
    assert "Traceback" not in err + out
    lines = [x for x in err.splitlines() if "error:" in x or x.startswith("usage:")]
    assert len(lines) == 1, err[-2000:]
    assert "internal error" not in err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert len(lines[0]) <= 500


@pytest.mark.parametrize("target", ["no_cache", "a_file"])
def test_cache_verify_of_no_cache_is_a_failed_check(target, files, capsys):
    rc, out, err = _run(["cache", "verify", files / target], capsys)
    assert rc == 1 and "Traceback" not in err + out
    assert f"error: manifest: no teacher cache at '{files / target}'" in out


def test_debug_flag_shows_the_traceback(files, monkeypatch):
    monkeypatch.delenv("DISTILL_JAX_DEBUG", raising=False)
    with pytest.raises(FileNotFoundError):
        cli.main(["--debug", "train", str(files / "nope.yaml")])
    with pytest.raises(FileNotFoundError):
        cli.main(["train", str(files / "nope.yaml"), "--debug"])
    monkeypatch.setenv("DISTILL_JAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        cli.main(["train", str(files / "nope.yaml")])


def test_a_bug_is_one_line_asking_for_debug(monkeypatch, capsys):
    monkeypatch.delenv("DISTILL_JAX_DEBUG", raising=False)

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "_cmd_export", broken)
    rc, out, err = _run(["export", "a", "b"], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "internal error: ZeroDivisionError: division by zero" in err and "--debug" in err


def test_long_messages_are_trimmed():
    from distill_jax.errors import MAX_MESSAGE_CHARS, one_line
    spec = json.dumps({"driver": "zarr3", "kvstore": {"path": "x" * 5000}})
    err = ValueError(f'NOT_FOUND: Error opening "zarr3" driver: not found [source locations=\'a.cc:1\'] '
                     f"[tensorstore_spec='{spec}']\nsecond line")
    assert one_line(err) == 'NOT_FOUND: Error opening "zarr3" driver: not found'
    assert len(one_line(ValueError("y" * 5000))) == MAX_MESSAGE_CHARS
    assert one_line(KeyError("missing key")) == "missing key"


def _subprocess(*args):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env.pop("DISTILL_JAX_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "distill_jax.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, env=env)


@pytest.mark.parametrize("argv,word", [
    (lambda d: ["train", "configs/tiny.yaml", "logging.every=0"], "logging.every"),
    (lambda d: ["train", "configs/tiny.yaml", f"teacher.cache={d / 'a_file'}", f"run_dir={d / 'r_sub'}",
                *FAST], "a_file"),
    (lambda d: ["mathgen", "--n", "2", "--out", d / "nodata_dir"], "nodata_dir"),
], ids=["config", "cache-file", "mathgen"])
def test_subprocess_stderr_is_one_line(argv, word, files):
    """As a real process: one line on stderr, nothing after it at interpreter exit."""
    proc = _subprocess(*argv(files))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and word in lines[0] and lines[0].startswith("distill-jax "), proc.stderr[-3000:]


def test_error_mid_run_leaves_no_noise_at_exit(tmp_path):
    """A bad record the loop reaches after asynchronous checkpoint saves began: the error is one
    line, and the saves finish instead of failing at interpreter exit ("Event loop is closed")."""
    rows = [json.dumps({"prompt": f"q{i} " * 20, "response": f"a{i} " * 20}) for i in range(60)]
    rows[50] = json.dumps({"prompt": 3})
    data = tmp_path / "late_bad.jsonl"
    data.write_text("\n".join(rows) + "\n")
    script = (
        "import sys\n"
        "from absl import flags; flags.FLAGS(sys.argv[:1], known_only=True)\n"
        "import distill_jax.data as d; d.scan_records = lambda *a, **k: None  # let the loop reach it\n"
        "from distill_jax import cli\n"
        f"sys.exit(cli.main(['train', 'configs/tiny.yaml', 'data.sources=[{{path: {data}}}]',\n"
        f"    'data.shuffle=false', 'run_dir={tmp_path / 'run'}', 'steps=40', 'checkpoint.every=1',\n"
        "    'logging.every=1', 'logging.progress=false']))\n")
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    env.pop("DISTILL_JAX_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("training ")]
    assert len(lines) == 1 and "late_bad.jsonl (line 51): record 50" in lines[0], proc.stderr[-3000:]


def test_library_errors_count_as_input_errors():
    """A cache that does not match the run, or an asset that cannot be fetched, is the user's to
    fix (one line, exit 2), though neither is a ValueError."""
    from distill_jax.assets import AssetError
    from distill_jax.cache.store import CacheError, CacheMismatchError
    from distill_jax.errors import UserError, is_user_error
    for err in (CacheMismatchError("x"), CacheError("x"), AssetError("x"), UserError("x"),
                NotADirectoryError("x"), IsADirectoryError("x"), PermissionError("x")):
        assert is_user_error(err), err
    assert not is_user_error(ZeroDivisionError("x")) and not is_user_error(TypeError("x"))
