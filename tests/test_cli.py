"""The CLI as the README shows it: train the tiny config, export the student, generate from
the export, write math problems; and the README's Python example runs as written."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd=REPO, check=True):
    proc = subprocess.run([sys.executable, "-m", "distill_jax.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True,
                          env={**__import__("os").environ, "XLA_FLAGS": "",
                               "JAX_PLATFORMS": "cpu"})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.slow
def test_train_export_generate(tmp_path):
    run_dir = tmp_path / "run"
    _cli("train", "configs/tiny.yaml", f"run_dir={run_dir}", "steps=6", "checkpoint.every=3",
         "logging.every=3")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [3, 6]
    out = _cli("export", run_dir, tmp_path / "hf").stdout.strip()
    assert Path(out) == (tmp_path / "hf").absolute()
    # transformers loads the export and agrees with our forward.
    from distill_jax import models as M
    from distill_jax.export import load_student
    student, _ = load_student(run_dir)
    hm = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.RandomState(0).randint(3, 259, (2, 24))
    ours = np.asarray(M.forward(student, tokens))
    with torch.no_grad():
        ref = hm(torch.tensor(tokens)).logits.numpy()
    assert np.abs(ours - ref).max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("abc")["input_ids"] == [100, 101, 102]
    gen = _cli("generate", out, "--prompt", "Tom has 3 apples.", "--max-new-tokens", "8")
    assert gen.stdout.startswith("### Tom has 3 apples.")


def test_cli_errors_are_clear(tmp_path):
    bad = _cli("train", "configs/tiny.yaml", "loss.temprature=2", check=False)
    assert bad.returncode == 2 and "did you mean 'temperature'" in bad.stderr
    missing = _cli("train", tmp_path / "nope.yaml", check=False)
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    no_run = _cli("export", tmp_path, tmp_path / "out", check=False)
    assert no_run.returncode == 2 and "not a distill-jax run directory" in no_run.stderr


def test_mathgen_command(tmp_path):
    _cli("mathgen", "--n", "5", "--seed", "1", "--out", tmp_path / "m.jsonl")
    rows = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and all("####" in r["response"] for r in rows)


def test_readme_python_example_runs():
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, re.S)
    runnable = [b for b in blocks if "# runnable" in b]
    assert runnable, "the README has a runnable Python example"
    for block in runnable:
        exec(compile(block, "README.md", "exec"), {})


@pytest.mark.slow
def test_cross_tokenizer_cache_train_eval(tmp_path):
    """The README's cross-tokenizer commands: cache the teacher, train from the cache, eval."""
    small = ["data.max_records=16", "steps=2", "checkpoint.every=2", "logging.every=1",
             "logging.progress=false"]
    cache = tmp_path / "cache"
    _cli("cache", "configs/tiny_xtok.yaml", f"teacher.cache={cache}", *small)
    _cli("train", "configs/tiny_xtok.yaml", f"teacher.cache={cache}", f"run_dir={tmp_path / 'run'}",
         *small)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["distill/alm_chunks"] > 0 for r in rows)
    out = _cli("eval", "configs/tiny_xtok.yaml", f"run_dir={tmp_path / 'run'}", "eval.math=null",
               "eval.sources=[{path: configs/data/math_test.jsonl}]", "eval.max_documents=4",
               *small).stdout
    report = json.loads((tmp_path / "run" / "eval" / "eval_step2.json").read_text())
    assert report["models"]["student"]["heldout"]["bits_per_byte"] > 0
    assert "bits/byte" in out or "bits_per_byte" in out


# ----------------------------------------------------------------------------- config headers
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def header_commands(path: Path) -> list[list[str]]:
    """The ``distill-jax ...`` commands in a config's header comment, as argv lists (after
    ``distill-jax``; ``&&`` chains split, ``\\`` continuations joined, ``$HOME`` expanded)."""
    import os
    import shlex
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    text = "\n".join(header).replace("\\\n#", " ")
    commands = []
    for line in text.splitlines():
        if not line.startswith("#  ") or "distill-jax " not in line:
            continue  # commands are indented; prose mentions distill-jax after "# "
        for part in line.split("&&"):
            if "distill-jax " not in part:
                continue
            words = shlex.split(os.path.expandvars(part[part.index("distill-jax "):]))
            commands.append(words[1:])
    return commands


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_header_commands_parse_and_validate(path, monkeypatch):
    """Every command in every config's header parses, and its config loads with its overrides."""
    from distill_jax import cli
    from distill_jax.config import load_run_config
    monkeypatch.chdir(REPO)
    commands = header_commands(path)
    assert commands, f"{path.name}: the header shows a launch command"
    for argv in commands:
        args = cli.build_parser().parse_args(argv)
        if args.command in ("train", "cache", "eval"):
            cfg = load_run_config(args.config, args.overrides)
            if args.command == "cache":
                assert cfg.teacher is not None and cfg.teacher.cache, f"{path.name}: {argv}"


TINY_RUN = ["steps=2", "checkpoint.every=2", "logging.every=1", "logging.progress=false",
            "data.max_records=16", "mesh.num_devices=1"]


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in CONFIGS if "tiny" in p.name  # traces configs:
                                  and not p.name.startswith("traces")],  # test_traces_run.py
                         ids=lambda p: p.name)
def test_tiny_header_commands_run(path, tmp_path, monkeypatch):
    """The tiny configs' header commands run as written (two steps each, outputs in tmp_path):
    train, and cache followed by training from that cache."""
    from distill_jax import cli
    monkeypatch.chdir(REPO)
    ran = 0
    for i, argv in enumerate(header_commands(path)):
        if argv[0] not in ("train", "cache") or any(a.startswith("loss.terms=") for a in argv[1:]):
            continue  # the loss-term variants are covered by the cross-tokenizer tests
        cache = [f"teacher.cache={tmp_path / 'cache'}"] if any(
            a.startswith("teacher.cache=") for a in argv) else []
        rc = cli.main([*argv, *cache, f"run_dir={tmp_path / f'run{i}'}", *TINY_RUN])
        assert rc == 0, argv
        ran += 1
    assert ran


# ----------------------------------------------------------------------------- path resolution
def test_config_paths_resolve_against_the_file(tmp_path, monkeypatch):
    """Input paths in a config file are relative to that file (a base file's to the base file);
    output paths and command-line overrides are relative to the working directory."""
    from distill_jax.config import load_run_config
    (tmp_path / "recipes" / "base").mkdir(parents=True)
    (tmp_path / "recipes" / "base" / "common.yaml").write_text(
        "tokenizer: bytes\nteacher: {preset: tiny-llama, tokenizer: tok_dir, hf_path: ckpt}\n"
        "eval: {sources: [{path: held.jsonl}], math: /abs/math.jsonl}\n")
    (tmp_path / "recipes" / "run.yaml").write_text(
        "base: base/common.yaml\nrun_dir: runs/x\n"
        "teacher: {cache: caches/t}\n"
        "data: {sources: [{path: data/train.jsonl}, {path: '~/home.jsonl'}]}\n")
    elsewhere = tmp_path / "work"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_run_config(tmp_path / "recipes" / "run.yaml")
    assert [s.path for s in cfg.data.sources] == [str(tmp_path / "recipes" / "data" / "train.jsonl"),
                                                  "~/home.jsonl"]
    assert cfg.eval.sources[0].path == str(tmp_path / "recipes" / "base" / "held.jsonl")
    assert cfg.eval.math == "/abs/math.jsonl"
    assert cfg.teacher.tokenizer == str(tmp_path / "recipes" / "base" / "tok_dir")
    assert cfg.teacher.hf_path == str(tmp_path / "recipes" / "base" / "ckpt")
    assert cfg.tokenizer == "bytes"  # a name, not a path
    assert cfg.run_dir == "runs/x" and cfg.teacher.cache == "caches/t"  # outputs: the working dir
    over = load_run_config(tmp_path / "recipes" / "run.yaml",
                           ["data.sources=[{path: mine.jsonl}]", "eval.math=m.jsonl"])
    assert over.data.sources[0].path == "mine.jsonl" and over.eval.math == "m.jsonl"
    # A config given by a relative path keeps relative paths (the saved config stays readable).
    monkeypatch.chdir(tmp_path)
    rel = load_run_config("recipes/run.yaml")
    assert rel.data.sources[0].path == os.path.join("recipes", "data", "train.jsonl")


def test_shipped_config_runs_from_another_directory(tmp_path, monkeypatch, capsys):
    """configs/tiny.yaml names its data relative to itself, so it works from any directory."""
    from distill_jax import cli
    monkeypatch.chdir(tmp_path)
    rc = cli.main(["data", "check", str(REPO / "configs" / "tiny.yaml"), "data.max_records=8"])
    assert rc == 0 and "8 records (0 bad)" in capsys.readouterr().out


# ----------------------------------------------------------------------------- progress
class _Stream:
    def __init__(self, tty: bool):
        self.text, self.tty = "", tty

    def write(self, s):
        self.text += s

    def flush(self):
        pass

    def isatty(self):
        return self.tty


def test_progress_is_plain_lines_when_not_a_terminal():
    from distill_jax.metrics import progress
    log = _Stream(tty=False)
    assert list(progress(range(1000), "eval", stream=log)) == list(range(1000))
    lines = log.text.splitlines()
    assert "\r" not in log.text and 2 <= len(lines) <= 11, lines
    assert lines[0].startswith("eval: 100/1000 (10%)") and lines[-1].startswith("eval: 1000/1000 done")
    term = _Stream(tty=True)
    assert list(progress(range(50), "eval", stream=term)) == list(range(50))
    assert "\r" in term.text  # a live bar on a terminal
    quiet = _Stream(tty=False)
    assert list(progress(range(5), "eval", stream=quiet, enabled=False)) == list(range(5))
    assert quiet.text == ""


def test_every_progress_bar_goes_through_metrics_progress():
    """tqdm redraws would fill log files: only metrics.progress may use tqdm (on a terminal)."""
    users = [p.relative_to(REPO).as_posix() for p in (REPO / "distill_jax").rglob("*.py")
             if "tqdm" in p.read_text() and p.name != "metrics.py"]
    assert users == []
