"""Exports never delete what they did not write: refused targets stay byte for byte as they
were, ``overwrite`` replaces only a previous export (atomically), and exported files get the
umask's permissions."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from distill_jax import fsutil, models as M
from distill_jax.models import hf as hfio

REPO = Path(__file__).resolve().parents[1]


def _snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (directories as None, files with their bytes)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def _model(seed: int) -> M.Model:
    return M.init(M.ModelConfig.tiny("llama", vocab_size=97), seed=seed)


def _assert_params_equal(a: M.Model, b: M.Model) -> None:
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """A two-step run of configs/tiny.yaml, in ``<tmp>/runs/tiny``."""
    from distill_jax.config import load_run_config
    from distill_jax.train.loop import run
    run_dir = tmp_path_factory.mktemp("project") / "runs" / "tiny"
    run(load_run_config(REPO / "configs" / "tiny.yaml",
                        [f"run_dir={run_dir}", "steps=2", "checkpoint.every=2",
                         "logging.every=1", "logging.progress=false", "eval.every=0"]))
    return run_dir


# ----------------------------------------------------------------------------- refused targets
@pytest.mark.parametrize("overwrite", [False, True])
def test_directory_with_user_files_is_refused_and_untouched(tmp_path, overwrite):
    out = tmp_path / "out"
    (out / "notes").mkdir(parents=True)
    (out / "thesis.tex").write_text("years of work")
    (out / "notes" / "a.txt").write_text("a")
    before = _snapshot(tmp_path)
    with pytest.raises(fsutil.OutputDirError, match="not empty and holds no previous export"):
        M.save_hf(_model(0), out, overwrite=overwrite)
    assert _snapshot(tmp_path) == before


def test_previous_export_with_added_user_file_is_refused(tmp_path):
    out = M.save_hf(_model(0), tmp_path / "out")
    (out / "README.md").write_text("my model card")
    before = _snapshot(tmp_path)
    with pytest.raises(fsutil.OutputDirError, match=r"did not write \(README.md\)"):
        M.save_hf(_model(1), out, overwrite=True)
    assert _snapshot(tmp_path) == before


def test_out_that_is_a_file_is_refused_and_unchanged(tmp_path):
    out = tmp_path / "model.bin"
    out.write_bytes(b"\x00precious")
    for overwrite in (False, True):
        with pytest.raises(fsutil.OutputDirError, match="is a file; choose a new directory"):
            M.save_hf(_model(0), out, overwrite=overwrite)
    assert out.read_bytes() == b"\x00precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin"]


@pytest.mark.parametrize("target", ["run", "runs", "project"])
def test_export_over_the_run_or_its_parents_is_refused(tiny_run, target):
    from distill_jax.export import export_run
    out = {"run": tiny_run, "runs": tiny_run.parent, "project": tiny_run.parents[1]}[target]
    before = _snapshot(tiny_run.parents[1])
    with pytest.raises(fsutil.OutputDirError, match="never replaced"):
        export_run(tiny_run, out, overwrite=True)
    assert _snapshot(tiny_run.parents[1]) == before


def test_current_directory_and_its_parents_are_refused(tmp_path, monkeypatch):
    """Even when the current directory holds a previous export and overwrite is asked for."""
    work = M.save_hf(_model(0), tmp_path / "work")
    monkeypatch.chdir(work)
    before = _snapshot(tmp_path)
    for out in (".", work, "..", tmp_path):
        with pytest.raises(fsutil.OutputDirError, match="current directory"):
            M.save_hf(_model(1), out, overwrite=True)
    assert _snapshot(tmp_path) == before
    assert Path.cwd() == work.resolve()


def test_home_and_root_are_refused(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(fsutil.OutputDirError, match="home directory"):
        fsutil.check_output_dir("~", overwrite=True)
    with pytest.raises(fsutil.OutputDirError, match="filesystem root"):
        fsutil.check_output_dir("/", overwrite=True)


def test_convert_gguf_refuses_a_directory_with_user_files(tmp_path):
    from distill_jax.models.gguf import gguf_to_hf
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"GGUF" + b" not read past the magic: the output is checked first")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before = _snapshot(tmp_path)
    with pytest.raises(fsutil.OutputDirError, match="holds no previous export"):
        gguf_to_hf(gguf_file, out, overwrite=True)
    assert _snapshot(tmp_path) == before


# ----------------------------------------------------------------------------- allowed targets
def test_missing_and_empty_directories_are_written(tmp_path):
    deep = M.save_hf(_model(0), tmp_path / "a" / "b" / "out")
    assert (deep / "model.safetensors").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert M.save_hf(_model(0), empty) == empty
    _assert_params_equal(M.load_hf(empty), _model(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "empty"]  # no temporary litter


def test_overwrite_replaces_a_previous_export(tmp_path):
    out = M.save_hf(_model(0), tmp_path / "out")
    marker = fsutil.read_marker(out)
    assert marker is not None and "model.safetensors" in marker["files"]
    with pytest.raises(fsutil.OutputDirError, match="holds a previous export; pass --overwrite"):
        M.save_hf(_model(1), out)
    _assert_params_equal(M.load_hf(out), _model(0))
    assert M.save_hf(_model(1), out, overwrite=True) == out
    _assert_params_equal(M.load_hf(out), _model(1))
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the old one and temporaries gone


def test_overwrite_through_a_symlink_keeps_the_link(tmp_path):
    real = M.save_hf(_model(0), tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real)
    M.save_hf(_model(1), link, overwrite=True)
    assert link.is_symlink()
    _assert_params_equal(M.load_hf(real), _model(1))


@pytest.mark.parametrize("failing", ["tensor writer", "rename into place"])
def test_failed_overwrite_keeps_the_previous_export(tmp_path, monkeypatch, failing):
    out = M.save_hf(_model(0), tmp_path / "out")
    before = _snapshot(tmp_path)
    if failing == "tensor writer":
        def boom(*args, **kwargs):
            raise OSError("disk full")

        monkeypatch.setattr(hfio, "write_safetensors", boom)
    else:
        rename = os.replace

        def boom(src, dst):
            if Path(src).name.startswith(".out.tmp-") and Path(dst).resolve() == out.resolve():
                raise OSError("disk full")
            rename(src, dst)

        monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        M.save_hf(_model(1), out, overwrite=True)
    monkeypatch.undo()
    assert _snapshot(tmp_path) == before  # intact, and no temporary directory left behind
    _assert_params_equal(M.load_hf(out), _model(0))


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644),
                                                        (0o027, 0o750, 0o640)])
def test_permissions_follow_the_umask(tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        out = M.save_hf(_model(0), tmp_path / "out")
        again = M.save_hf(_model(1), out, overwrite=True)
    finally:
        os.umask(old)
    for d in (out, again):
        assert d.stat().st_mode & 0o777 == dir_mode
        modes = {p.name: p.stat().st_mode & 0o777 for p in d.iterdir()}
        assert modes and set(modes.values()) == {file_mode}, modes


# ----------------------------------------------------------------------------- CLI
def _cli(*args):
    return subprocess.run([sys.executable, "-m", "distill_jax.cli", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True,
                          env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})


def test_cli_export_refuses_then_overwrites_only_its_own_export(tiny_run, tmp_path):
    runs = tiny_run.parent
    before = _snapshot(runs)
    refused = _cli("export", tiny_run, runs, "--overwrite")
    assert refused.returncode == 2 and "never replaced" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _snapshot(runs) == before

    out = tmp_path / "hf"
    assert _cli("export", tiny_run, out).returncode == 0
    again = _cli("export", tiny_run, out)
    assert again.returncode == 2 and "pass --overwrite" in again.stderr
    assert _cli("export", tiny_run, out, "--overwrite").returncode == 0
    from distill_jax.export import load_student
    _assert_params_equal(M.load_hf(out), load_student(tiny_run)[0])
