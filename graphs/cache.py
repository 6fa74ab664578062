"""On-disk cache of ONNX exports, safe when several processes export the same key at once.

Key = family, exporter, attention implementation, KV-cache flag, the torch / transformers /
onnxscript versions, and a hash of this package's source (any builder edit invalidates it).
Writers export into a private temporary file and `os.replace` it into place, so a reader never
sees a half-written model; a per-key lock makes a second process wait for the first one's
result instead of exporting again. Writing a new export deletes that variant's exports made
by other versions.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import pathlib
import tempfile

CACHE_ENV = "ASA_GRAPHS_CACHE"
_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def default_cache_dir() -> pathlib.Path:
    """`$ASA_GRAPHS_CACHE`, else `<repo>/.cache/graphs` (else `~/.cache/asa_export/graphs`).

    Returns:
        The cache folder (not created).
    """
    env = os.environ.get(CACHE_ENV)
    if env:
        return pathlib.Path(env)
    repo = _PACKAGE_DIR.parent
    if (repo / "setup.py").is_file():
        return repo / ".cache" / "graphs"
    return pathlib.Path.home() / ".cache" / "asa_export" / "graphs"


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "none"


def source_hash() -> str:
    """Hash of every .py file of the graphs package (the builders and exporters).

    Returns:
        12 hex digits.
    """
    digest = hashlib.sha256()
    for path in sorted(_PACKAGE_DIR.glob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cache_key(family: str, exporter: str, attn: str, kv_cache: bool) -> str:
    """File stem naming one export: readable fields plus a hash of everything that changes it.

    Args:
        family, exporter, attn, kv_cache: the variant.

    Returns:
        A string usable as a file name.
    """
    versions = ":".join(f"{d}={_version(d)}" for d in ("torch", "transformers", "onnxscript", "onnx"))
    digest = hashlib.sha256(f"{versions}:{source_hash()}".encode()).hexdigest()[:12]
    kv = "kv" if kv_cache else "nokv"
    return f"{family}-{exporter}-{attn}-{kv}-{digest}"


@contextlib.contextmanager
def _locked(lock_path: pathlib.Path):
    """Exclusive advisory lock (POSIX); without fcntl the atomic rename alone keeps it safe."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def cached_file(cache_dir: pathlib.Path, stem: str, produce) -> pathlib.Path:
    """Return `<cache_dir>/<stem>.onnx`, calling `produce(tmp_path)` to write it if absent.

    Args:
        cache_dir: the cache folder (created if needed).
        stem: the cache key.
        produce: callable writing a complete ONNX file (weights inline) to the path it is given.

    Returns:
        Path of the cached file.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{stem}.onnx"
    if target.is_file():
        return target
    with _locked(cache_dir / f"{stem}.lock"):
        if target.is_file():  # another process exported it while we waited
            return target
        fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".onnx.tmp", dir=cache_dir)
        os.close(fd)
        try:
            produce(pathlib.Path(tmp))
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    _prune_stale(cache_dir, stem)
    return target


def _prune_stale(cache_dir: pathlib.Path, stem: str) -> None:
    """Delete exports of the same variant made by other versions (SmolLM2 ones are 0.5 GB each)."""
    variant, _, digest = stem.rpartition("-")
    if not variant:
        return
    for path in cache_dir.glob(f"{variant}-*"):
        other = path.name.split(".")[0].rpartition("-")
        if other[0] == variant and other[2] != digest and path.suffix in (".onnx", ".lock"):
            path.unlink(missing_ok=True)
