"""ONNX Runtime sessions that run `asa::AdaptiveSparseAttention` nodes with our custom-op library.

    model.asa.onnx --session()--> InferenceSession
        library found:   ASA nodes run the native kernel (libasa_ort.so, CPU execution provider)
        library missing: one warning, ASA nodes run their model-local function (same semantics)

The library is found through `library_path()`: the `library` argument, else $ASA_ORT_LIB, else
the default build folder (`plugins/build/onnxruntime/libasa_ort.so`, made by
`python tools/build_plugins.py`).

Polygraphy: `OnnxrtRunner` takes a session or a callable returning one, so
`OnnxrtRunner(functools.partial(session, "model.asa.onnx"))` runs the rewritten model with the
library.
"""

from __future__ import annotations

import os
import warnings
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

from asa_export.errors import AsaExportError

if TYPE_CHECKING:  # onnxruntime is imported lazily (house rule 4)
    import onnxruntime

ENV_VAR = "ASA_ORT_LIB"
LIBRARY_NAME = "libasa_ort.so"
_REPO = Path(__file__).resolve().parents[2]
# Where the library may sit: beside the package (an installed build), then the build folder.
_DEFAULT_LOCATIONS = (
    Path(__file__).resolve().parent / LIBRARY_NAME,
    _REPO / "plugins" / "build" / "onnxruntime" / LIBRARY_NAME,
)
_warned: set[str] = set()
# Options we registered the library into: ONNX Runtime rejects a second registration of the
# same domain ("Domain already set in registry"), so reusing such options must not re-register.
_registered = weakref.WeakKeyDictionary()


def library_path() -> Path | None:
    """Path of the ASA custom-op library for ONNX Runtime, or None when it is not built.

    Returns:
        $ASA_ORT_LIB when set (even if the file is missing: `session` then reports it), else the
        first existing default location, else None.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    for candidate in _DEFAULT_LOCATIONS:
        if candidate.is_file():
            return candidate
    return None


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _resolve_library(library) -> Path | None:
    """The library to register, or None for the function-body fallback."""
    if library is False:
        return None
    if library is None or library is True:
        path = library_path()
        if path is None:
            if library is True:
                raise AsaExportError(
                    f"the ASA ONNX Runtime library is not built: run `python tools/build_plugins.py` "
                    f"or set {ENV_VAR}")
            _warn_once("missing", (
                "ASA ONNX Runtime library not found (run `python tools/build_plugins.py` or set "
                f"{ENV_VAR}); AdaptiveSparseAttention nodes run their model-local function body "
                "(same results, dense and much slower)"))
            return None
    else:
        path = Path(library)
    if not path.is_file():
        source = f"${ENV_VAR}" if library in (None, True) else "library="
        raise AsaExportError(f"ASA ONNX Runtime library {path} (from {source}) does not exist; "
                             "build it with `python tools/build_plugins.py`")
    return path


def session_options(library=None, sess_options=None) -> tuple["onnxruntime.SessionOptions", Path | None]:
    """Session options with the ASA library registered (when available).

    Args:
        library: path of libasa_ort.so; None = `library_path()` with a warning and the function
            fallback when missing; True = required; False = never register (function body).
        sess_options: options to register into (modified in place); None = fresh options.

    Returns:
        (options, path of the registered library or None).
    """
    import onnxruntime as ort

    opts = sess_options if sess_options is not None else ort.SessionOptions()
    path = _resolve_library(library)
    if path is None:
        return opts, None
    if opts in _registered:
        return opts, _registered[opts]
    try:
        opts.register_custom_ops_library(str(path))
    except Exception as err:  # onnxruntime raises plain RuntimeError / Fail
        raise AsaExportError(f"ONNX Runtime could not load the ASA library {path}: {err}. "
                             "Rebuild it with `python tools/build_plugins.py`.") from err
    _registered[opts] = path
    return opts, path


def session(path_or_bytes, providers=None, *, library=None,
            sess_options=None) -> "onnxruntime.InferenceSession":
    """An InferenceSession whose ASA nodes run the native library (or, without it, the function).

    Args:
        path_or_bytes: model path (external data beside it is found) or serialized model bytes.
        providers: execution providers; None = ["CPUExecutionProvider"].
        library: see `session_options` (None = find it, warn once and fall back when missing).
        sess_options: onnxruntime.SessionOptions to use (the library is registered into them;
            pass fresh options for each session).

    Returns:
        onnxruntime.InferenceSession.
    """
    import onnxruntime as ort

    opts, _ = session_options(library, sess_options)
    if isinstance(path_or_bytes, os.PathLike):
        path_or_bytes = os.fspath(path_or_bytes)
    try:
        return ort.InferenceSession(path_or_bytes, sess_options=opts,
                                    providers=providers or ["CPUExecutionProvider"])
    except Exception as err:
        name = path_or_bytes if isinstance(path_or_bytes, str) else "the model"
        raise AsaExportError(f"ONNX Runtime cannot load {name}: {err}") from err
