"""Hardened runs: the run-directory lock, damaged checkpoints, non-finite steps, resuming with a
corrected, moved or longer config (the schedule horizon)."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from distill_jax import checkpoint, losses
from distill_jax.config import ResumeConfigError, load_run_config
from distill_jax.locking import FileLock, LockedError
from distill_jax.train import optim
from distill_jax.train.loop import LOCK_FILE, run
from distill_jax.train.assemble import RunSetup

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"


def _tiny(run_dir, *overrides: str):
    return load_run_config(TINY, [f"run_dir={run_dir}", "logging.every=1", "steps=10",
                                  "checkpoint.every=5", "logging.progress=false", *overrides])


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _params(run_dir: Path, step: int | None = None):
    return checkpoint.load_state_dict(run_dir / "checkpoints", step)["params"]


def _assert_equal_params(a, b) -> None:
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ----------------------------------------------------------------------------- the lock
_HOLD = ("import sys, time; from distill_jax.locking import FileLock; "
         "lock = FileLock(sys.argv[1], 'run directory lock').acquire(); print('held', flush=True); "
         "time.sleep(600)")


def test_second_run_refused_while_the_first_lives_and_a_killed_holder_leaves_no_block(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir / LOCK_FILE)],
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(LockedError) as e:
            run(_tiny(run_dir))
        message = str(e.value)
        assert f"pid {holder.pid} on host {socket.gethostname()} since " in message
        assert "\n" not in message and "wait for it to finish or stop it" in message
        assert not (run_dir / "config.yaml").exists() and not (run_dir / "checkpoints").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with FileLock(run_dir / LOCK_FILE, "run directory lock"):  # the kernel freed it
        with pytest.raises(LockedError, match=f"pid {os.getpid()} "):
            FileLock(run_dir / LOCK_FILE, "run directory lock").acquire()
    FileLock(run_dir / LOCK_FILE, "run directory lock").acquire().release()


# ----------------------------------------------------------------------------- checkpoints
def test_state_digest_is_sharding_independent_and_sees_one_bit(devices8):
    mesh = jax.sharding.Mesh(np.array(devices8).reshape(4, 2), ("a", "b"))
    x = np.random.RandomState(0).randn(16, 6).astype(np.float32)
    spec = jax.sharding.PartitionSpec("a", "b")
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, spec))
    state = {"w": jnp.asarray(x), "n": jnp.arange(5, dtype=jnp.int32)}
    digests, nonfinite = checkpoint.state_digests(state)
    assert checkpoint.state_digests({"w": sharded, "n": state["n"]})[0] == digests
    assert nonfinite == []
    flipped = x.copy()
    flipped.view(np.uint32)[7, 3] ^= 1 << 30
    assert checkpoint.state_digests({"w": flipped, "n": state["n"]})[0]["['w']"] != digests["['w']"]
    swapped = x[::-1].copy()  # the same values in another order
    assert checkpoint.state_digests({"w": swapped, "n": state["n"]})[0]["['w']"] != digests["['w']"]
    x[2, 2] = np.nan
    assert checkpoint.state_digests({"w": x, "n": state["n"]})[1] == ["['w']"]


def _data_files(run_dir: Path, step: int) -> list[Path]:
    """The files of the arrays' data."""
    return sorted((run_dir / "checkpoints" / str(step) / "state").glob("ocdbt.process_*/d/*"))


def _truncate(run_dir: Path, step: int) -> None:
    for f in _data_files(run_dir, step):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip(run_dir: Path, step: int, at: Callable[[int], slice]) -> None:
    for f in _data_files(run_dir, step):
        data = bytearray(f.read_bytes())
        data[at(len(data))] = bytes(b ^ 0xFF for b in data[at(len(data))])
        f.write_bytes(bytes(data))


def _flip_one_byte(run_dir: Path, step: int) -> None:
    """A change the array decoder may not notice (the arrays then load, with wrong values)."""
    _flip(run_dir, step, lambda n: slice(n // 10, n // 10 + 1))


def _flip_many_bytes(run_dir: Path, step: int) -> None:
    _flip(run_dir, step, lambda n: slice(n // 100, n, 997))


def _corrupt_digest(run_dir: Path, step: int) -> None:
    """The checkpoint's arrays no longer match the digests saved with them."""
    f = next((run_dir / "checkpoints" / str(step) / checkpoint.CHECKSUMS).iterdir())
    saved = json.loads(f.read_text())
    key = next(k for k in saved["leaves"] if "embed" in k)
    saved["leaves"][key] = (saved["leaves"][key] + 1) % 2**32
    f.write_text(json.dumps(saved))


@pytest.mark.parametrize("damage", [_truncate, _flip_one_byte, _flip_many_bytes, _corrupt_digest],
                         ids=["truncated", "one_byte_flipped", "bytes_flipped", "digest_differs"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys, damage):
    run_dir = tmp_path / "run"
    one_device = ("mesh.num_devices=1", "mesh.data=1")  # one copy of the data: every file is read
    run(_tiny(run_dir, *one_device))
    intact = _params(run_dir, 10)
    damage(run_dir, 10)
    capsys.readouterr()
    run(_tiny(run_dir, *one_device))
    err = capsys.readouterr().err
    assert "skipped checkpoint 10: it" in err and f"resumed {run_dir} from step 5" in err
    assert (run_dir / "checkpoints_damaged" / "10").is_dir()
    # Steps 6..10 again, from step 5's params, optimiser state and data position: the same run.
    assert checkpoint.latest_step(run_dir / "checkpoints") == 10
    _assert_equal_params(intact, _params(run_dir, 10))
    assert all(np.isfinite(r["distill/loss"]) for r in _rows(run_dir))


def test_no_intact_checkpoint_is_refused_not_restarted(tmp_path):
    run_dir = tmp_path / "run"
    run(_tiny(run_dir, "mesh.num_devices=1", "mesh.data=1"))
    _truncate(run_dir, 10)
    _flip_many_bytes(run_dir, 5)
    with pytest.raises(checkpoint.CheckpointRestoreError,
                       match=r"no checkpoint in .* is intact: step 10: .*; step 5: .*; move "):
        run(_tiny(run_dir, "mesh.num_devices=1", "mesh.data=1"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["10", "5"]


# ----------------------------------------------------------------------------- non-finite steps
def _poison(monkeypatch, at_step: int) -> None:
    """Step ``at_step`` diverges: NaN loss and params (as a far too large update would)."""
    make = RunSetup.train_step

    def train_step(self, optimizer, schedule):
        step = make(self, optimizer, schedule)

        def poisoned(state, teacher_params, batch):
            new, metrics = step(state, teacher_params, batch)
            bad = state.step + 1 == at_step
            nan = lambda x: jnp.where(bad, jnp.nan, x)
            return new.replace(params=jax.tree.map(nan, new.params)), {
                **metrics, losses.LOSS: nan(metrics[losses.LOSS])}
        return poisoned
    monkeypatch.setattr(RunSetup, "train_step", train_step)


@pytest.mark.parametrize("at_step", [5, 7])
def test_nonfinite_step_stops_the_run_without_checkpointing_it(tmp_path, monkeypatch, at_step):
    run_dir = tmp_path / "run"
    _poison(monkeypatch, at_step)
    with pytest.raises(optim.NonFiniteError, match=f"^step {at_step} is not finite .*nan.*"
                                                   "optimizer.skip_nonfinite=true"):
        run(_tiny(run_dir))
    steps = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and max(steps) < at_step and (5 in steps) == (at_step > 5)
    for step in steps:
        _, nonfinite = checkpoint.state_digests(checkpoint.load_state_dict(run_dir / "checkpoints",
                                                                           step))
        assert nonfinite == []


def test_skip_nonfinite_keeps_the_state_of_the_step_before(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    _poison(monkeypatch, 7)
    run(_tiny(run_dir, "optimizer.skip_nonfinite=true", "checkpoint.every=1", "checkpoint.keep=20"))
    flags = {r["step"]: r[optim.NONFINITE] for r in _rows(run_dir)}
    assert flags == {s: float(s == 7) for s in range(1, 11)}
    before, after = (checkpoint.load_state_dict(run_dir / "checkpoints", s) for s in (6, 7))
    _assert_equal_params(before["params"], after["params"])
    _assert_equal_params(before["opt_state"], after["opt_state"])
    assert int(after["step"]) == 7
    final = checkpoint.load_state_dict(run_dir / "checkpoints", 10)
    assert checkpoint.state_digests(final)[1] == []
    with pytest.raises(AssertionError):  # and training went on after it
        _assert_equal_params(after["params"], final["params"])


def test_divergence_exits_nonzero_from_the_cli(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "distill_jax.cli", "train", str(TINY), f"run_dir={run_dir}",
         "steps=6", "checkpoint.every=1", "optimizer.lr=1e30", "logging.progress=false"],
        cwd=REPO, capture_output=True, text=True,
        env={**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"})
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "error: step " in last and "is not finite" in last, proc.stderr[-2000:]
    for p in (run_dir / "checkpoints").iterdir():
        assert checkpoint.state_digests(checkpoint.load_state_dict(p.parent, int(p.name)))[1] == []


# ----------------------------------------------------------------------------- resuming
def test_typo_then_corrected_retry_and_unfinished_run_dir_reused(tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError):
        run(_tiny(run_dir, "student.preset=tiny-lama"))
    assert not (run_dir / "config.yaml").exists()
    (run_dir / "config.yaml").write_text("steps: 1\n")  # a run that never reached a checkpoint
    run(_tiny(run_dir, "steps=5"))
    assert checkpoint.latest_step(run_dir / "checkpoints") == 5
    assert load_run_config(run_dir / "config.yaml").steps == 5


def test_refusal_names_each_changed_key_with_old_and_new_value(tmp_path):
    run_dir = tmp_path / "run"
    run(_tiny(run_dir, "steps=5"))
    with pytest.raises(ResumeConfigError) as e:
        run(_tiny(run_dir, "steps=5", "loss.temperature=3.0", "student.overrides.num_layers=2"))
    message = str(e.value)
    assert "loss.temperature: 1.0 -> 3.0" in message
    assert "student.overrides.num_layers: 1 -> 2" in message and "\n" not in message


def test_relative_absolute_and_moved_run_dirs_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    data = f"data.sources=[{{path: {REPO}/configs/data/math_train.jsonl}}]"
    run(_tiny("rel", "steps=5", data))
    run(_tiny(tmp_path / "rel", "steps=10", data))
    assert f"resumed {tmp_path / 'rel'} from step 5" in capsys.readouterr().err
    shutil.move(tmp_path / "rel", tmp_path / "moved")
    run(_tiny(tmp_path / "moved", "steps=15", data))
    assert f"resumed {tmp_path / 'moved'} from step 10" in capsys.readouterr().err
    assert checkpoint.latest_step(tmp_path / "moved" / "checkpoints") == 15


def _lr(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/lr"] for r in _rows(run_dir)}


def test_more_steps_keep_the_schedule_horizon_unless_a_new_one_is_stated(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run(_tiny(run_dir))
    run(_tiny(run_dir, "steps=14"))
    err = capsys.readouterr().err
    assert ("the learning-rate schedule keeps its horizon of 10 steps; set "
            "optimizer.schedule_steps=14 to re-plan it") in err
    opt = load_run_config(TINY).optimizer
    recorded = optim.make_schedule(opt, 10)
    lr = _lr(run_dir)
    for step in range(1, 15):  # the lr logged at step s is the one step s trained with
        assert lr[step] == pytest.approx(float(recorded(step - 1)), rel=1e-6), step
    assert load_run_config(run_dir / "config.yaml").optimizer.schedule_steps == 10
    # A stated horizon re-plans it from here on.
    run(_tiny(run_dir, "steps=18", "optimizer.schedule_steps=18"))
    assert "re-planned from a horizon of 10 to 18 steps" in capsys.readouterr().err
    replanned = optim.make_schedule(opt, 18)
    lr = _lr(run_dir)
    for step in range(15, 19):
        assert lr[step] == pytest.approx(float(replanned(step - 1)), rel=1e-6), step
    assert float(replanned(14)) > 2 * float(recorded(14))
    assert load_run_config(run_dir / "config.yaml").optimizer.schedule_steps == 18
