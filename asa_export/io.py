"""Load and save ONNX models safely: external data, models over 2 GB, atomic writes.

    path (.onnx [+ external data])  ->  load_model  ->  onnx_ir.Model (weights stay on disk, lazy)
    onnx_ir.Model  ->  save_model  ->  temp dir beside the output  ->  fsync  ->  rename into place

onnx_ir keeps external tensors as lazy references and writes them back tensor by tensor, so no
protobuf message ever holds the weights: models over 2 GB load and save without protobuf limits.
Every failure a user can cause is an AsaExportError that names the file at fault.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator

import onnx
import onnx_ir as ir
from google.protobuf.message import EncodeError

from asa_export.errors import AsaExportError

logger = logging.getLogger(__name__)

# Above this many bytes of initializers the output gets an external data file: protobuf refuses
# messages over 2 GiB, and the graph itself needs headroom below that.
EXTERNAL_DATA_THRESHOLD = int(1.5 * 2**30)
# With external data, tensors at most this big stay inline (shapes, scalars): readable graphs.
INLINE_TENSOR_BYTES = 256
# Key in `Model.meta` (not serialized) holding the absolute path the model was loaded from.
SOURCE_KEY = "asa_export.source_path"


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model, leaving external weights on disk until they are needed.

    Args:
        path: the .onnx file; its external data files are looked up relative to it.

    Returns:
        The model as an `onnx_ir.Model`; `model.meta[SOURCE_KEY]` holds its absolute path.

    Raises:
        AsaExportError: the path is missing or a directory, the file is not an ONNX model or is
            truncated, or an external-data file is missing or too short.
    """
    path = os.path.abspath(os.fspath(path))
    _check_readable_file(path)
    proto = _parse_model(path)
    model = ir.from_proto(proto)
    del proto
    # Relative base dirs would resolve against the current directory, which callers may change.
    ir.external_data.set_base_dir(model.graph, os.path.dirname(path))
    _check_external_data(model, path)
    model.meta[SOURCE_KEY] = path
    return model


def save_model(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | None = None,
) -> None:
    """Write `model` atomically; never touches the file the model was loaded from.

    The model goes to a temporary directory beside `path`, is fsynced, then renamed into place
    (external data first, the .onnx last), so a reader never sees a half-written output and a
    failure leaves nothing behind.

    Args:
        model: the model to write (not modified).
        path: the output .onnx file; external data goes to `<name>.data` beside it.
        external_data: True / False to force; None (default) uses external data when the input
            had external data or the initializers exceed EXTERNAL_DATA_THRESHOLD bytes.

    Raises:
        AsaExportError: the output would overwrite an input file, its directory is missing or
            unwritable, or the model is too large for a single protobuf file.
    """
    path = os.path.abspath(os.fspath(path))
    out_dir, name = os.path.split(path)
    use_external = _wants_external_data(model, external_data)
    data_name = name + ".data"
    check_output_path(path, inputs=model_files(model))
    if use_external:
        check_output_path(os.path.join(out_dir, data_name), inputs=model_files(model))
    with _temp_dir(out_dir, name) as tmp:
        tmp_model = os.path.join(tmp, name)
        _write(model, tmp_model, data_name if use_external else None)
        written = [data_name] if use_external else []
        written.append(name)
        for item in written:
            _fsync_file(os.path.join(tmp, item))
        _move_into_place(tmp, out_dir, written)
    logger.debug("wrote %s%s", path, f" (+ {data_name})" if use_external else "")


def check_output_path(path: str | os.PathLike, *, inputs: list[str] = ()) -> None:
    """Fail early, before any work, when `path` cannot or must not be written.

    Args:
        path: the intended output file.
        inputs: files that must never be overwritten (the input model and its data files).

    Raises:
        AsaExportError: `path` is one of `inputs` (after resolving links), is a directory, or
            its directory is missing, not a directory or not writable.
    """
    path = os.path.abspath(os.fspath(path))
    for source in inputs:
        if _same_file(path, source):
            raise AsaExportError(
                f"the output {path} is the input file {source}; choose another output path "
                "(asa-export never overwrites its input)"
            )
    if os.path.isdir(path):
        raise AsaExportError(f"the output {path} is a directory; give a file path")
    out_dir = os.path.dirname(path)
    if not os.path.exists(out_dir):
        raise AsaExportError(f"the output directory {out_dir} does not exist; create it first")
    if not os.path.isdir(out_dir):
        raise AsaExportError(f"the output's parent {out_dir} is not a directory")
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise AsaExportError(f"cannot write to the output directory {out_dir}: permission denied")
    _probe_writable(out_dir)


def model_files(model: ir.Model) -> list[str]:
    """Files `model` reads from: the .onnx it was loaded from and its external data files.

    Returns:
        Absolute paths (the source first, when known).
    """
    files = []
    source = model.meta.get(SOURCE_KEY)
    if source:
        files.append(source)
    for tensor in _external_tensors(model):
        data_path = _external_path(tensor)
        if data_path not in files:
            files.append(data_path)
    return files


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[str]:
    """A temporary path beside `path` that becomes `path` when the block succeeds.

    Write the file at the yielded path (any writer: text, np.savez, torch.save, bytes); on a
    normal exit it gets the usual file mode (0666 minus the umask), is fsynced and renamed onto
    `path` (then the directory is fsynced); on an exception it is removed and `path` is left as
    it was. Nested blocks rename innermost first.

    Args:
        path: the final file; its directory must exist.
        suffix: ending of the temporary name, for writers that add one (np.savez: ".npz").

    Yields:
        The temporary path.

    Raises:
        AsaExportError: the directory is missing or not writable.
    """
    path = os.path.abspath(os.fspath(path))
    out_dir, name = os.path.split(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=f".tmp{suffix}")
    except OSError as err:
        raise AsaExportError(f"cannot write to the directory {out_dir}: {err.strerror}") from err
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; outputs get the usual mode
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(out_dir)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file (a JSON report) atomically (`atomic_path`).

    Raises:
        AsaExportError: the directory is missing or not writable.
    """
    check_output_path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _probe_writable(out_dir: str) -> None:
    """Create and remove a temporary file: access() says yes to root on read-only filesystems."""
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".asa-export-probe.", suffix=".tmp")
    except OSError as err:
        raise AsaExportError(
            f"cannot write to the output directory {out_dir}: {err.strerror or err}"
        ) from err
    os.close(fd)
    os.unlink(probe)


# -- loading ---------------------------------------------------------------------------------


def _check_readable_file(path: str) -> None:
    if not os.path.exists(path):
        raise AsaExportError(f"no such file: {path}")
    if os.path.isdir(path):
        raise AsaExportError(f"{path} is a directory; give the path of an .onnx file")
    if not os.access(path, os.R_OK):
        raise AsaExportError(f"cannot read {path}: permission denied")


def _parse_model(path: str) -> onnx.ModelProto:
    """Parse the protobuf only (weights in external files are not read)."""
    try:
        proto = onnx.load(path, format="protobuf", load_external_data=False)
    except Exception as err:  # protobuf raises DecodeError or RuntimeWarning-like errors
        raise AsaExportError(
            f"{path} is not a readable ONNX model (the file is corrupt, truncated or of "
            f"another format): {type(err).__name__}: {err}"
        ) from err
    # Protobuf accepts some non-ONNX bytes (an empty file parses as an empty message).
    if proto.ir_version <= 0 or not proto.opset_import or not proto.graph.node:
        raise AsaExportError(
            f"{path} is not an ONNX model (no IR version, opset import or graph nodes); "
            "the file may be truncated or of another format"
        )
    return proto


def _check_external_data(model: ir.Model, path: str) -> None:
    for tensor in _external_tensors(model):
        data_path = _external_path(tensor)
        if not os.path.isfile(data_path):
            raise AsaExportError(
                f"the external data file {data_path} (tensor {tensor.name!r} of {path}) is "
                "missing; keep the model's data files beside it"
            )
        size = os.path.getsize(data_path)
        end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else 0)
        if size < end:
            raise AsaExportError(
                f"the external data file {data_path} is truncated: tensor {tensor.name!r} "
                f"needs bytes up to {end}, the file has {size}"
            )


def _external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    for graph in model.graphs():
        for value in graph.initializers.values():
            if isinstance(value.const_value, ir.ExternalTensor):
                yield value.const_value


def _external_path(tensor: ir.ExternalTensor) -> str:
    return os.path.abspath(os.path.join(tensor.base_dir, tensor.location))


# -- saving ----------------------------------------------------------------------------------


def _wants_external_data(model: ir.Model, forced: bool | None) -> bool:
    if forced is not None:
        return bool(forced)
    if any(True for _ in _external_tensors(model)):
        return True
    total = sum(
        value.const_value.nbytes
        for graph in model.graphs()
        for value in graph.initializers.values()
        if value.const_value is not None
    )
    return total > EXTERNAL_DATA_THRESHOLD


@contextlib.contextmanager
def _temp_dir(out_dir: str, name: str) -> Iterator[str]:
    """A temporary directory beside the output (same filesystem: renames are atomic)."""
    try:
        tmp = tempfile.mkdtemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    except OSError as err:
        raise AsaExportError(f"cannot write to the directory {out_dir}: {err.strerror}") from err
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write(model: ir.Model, tmp_model: str, data_name: str | None) -> None:
    try:
        if data_name is None:
            with _inlined(model):
                ir.save(model, tmp_model)
        else:
            ir.save(
                model, tmp_model, external_data=data_name, size_threshold_bytes=INLINE_TENSOR_BYTES
            )
    except (ValueError, EncodeError) as err:
        if isinstance(err, EncodeError) or "2GB" in str(err) or "exceeds maximum" in str(err):
            raise AsaExportError(
                f"the model is too large for one protobuf file ({type(err).__name__}: {err}); "
                "save it with external data"
            ) from err
        raise
    except OSError as err:
        out_dir = os.path.dirname(os.path.dirname(tmp_model))
        name = os.path.basename(tmp_model)
        raise AsaExportError(f"cannot write {name} in {out_dir}: {err.strerror or err}") from err


@contextlib.contextmanager
def _inlined(model: ir.Model) -> Iterator[None]:
    """Temporarily read external tensors into memory so a single-file save embeds them."""
    values = [
        value
        for graph in model.graphs()
        for value in graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    ]
    originals = [value.const_value for value in values]
    for value, tensor in zip(values, ir.external_data.convert_tensors_from_external(originals)):
        value.const_value = tensor
    try:
        yield
    finally:
        for value, tensor in zip(values, originals):
            value.const_value = tensor


def _move_into_place(tmp: str, out_dir: str, names: list[str]) -> None:
    """Rename the written files into `out_dir`, the .onnx (last in `names`) last."""
    moved = []
    try:
        for item in names:
            os.replace(os.path.join(tmp, item), os.path.join(out_dir, item))
            moved.append(item)
    except OSError as err:
        # A data file without its .onnx is useless: take back what was moved.
        for item in moved:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out_dir, item))
        raise AsaExportError(f"cannot write into {out_dir}: {err.strerror or err}") from err
    _fsync_dir(out_dir)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: str) -> None:
    # Makes the rename itself durable; some filesystems refuse fsync on directories.
    with contextlib.suppress(OSError):
        _fsync_file(path)


def _same_file(a: str, b: str) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
