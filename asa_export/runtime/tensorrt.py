"""TensorRT engines of rewritten models: `asa-export model.onnx --out engine.plan`.

    model.asa.onnx  ->  engine copy: ASA nodes without functions, optional slots made explicit
                    ->  precision (asa_export.passes.precision: fp16 / bf16, strongly typed)
                    ->  TensorRT ONNX parser (each ASA node -> our IPluginV3, libasa_trt.so)
                    ->  builder (optimization profile for dynamic batch / sequence)
                    ->  engine.plan + engine.plan.json (written atomically, together)

The engine copy drops the model-local functions: TensorRT's parser would otherwise fall back to
a function when the plugin is not registered (building a slow dense engine silently), and it
keys functions by name alone, while our overloads share the name `AdaptiveSparseAttention`.
Without functions a missing plugin is a clear parse error.

`tensorrt` is imported lazily (house rule 4). `backend="tensorrt-rtx"` uses TensorRT-RTX's
bindings (`tensorrt_rtx_bindings`, same nvinfer1 API), which build ahead of time for a chosen
compute capability without a GPU (SM75-SM121, not SM90): that is how CI proves parse + plugin +
build on a CPU machine. Engines for Hopper need TensorRT itself on a Hopper machine.

The plugin library is found through `plugin_library_path()`: the argument, else $ASA_TRT_PLUGIN,
else the build folder of `python tools/build_trt_plugin.py` (plugins/tensorrt/build/tensorrt/).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

import onnx_ir as ir

from asa_export import contract, io
from asa_export.errors import AsaExportError
from asa_export.passes.rewrite import asa_nodes

ENV_VAR = "ASA_TRT_PLUGIN"
LIBRARY_NAME = "libasa_trt.so"
_REPO = Path(__file__).resolve().parents[2]
_DEFAULT_LOCATIONS = (
    Path(__file__).resolve().parent / LIBRARY_NAME,
    _REPO / "plugins" / "tensorrt" / "build" / "tensorrt" / LIBRARY_NAME,
)
BACKENDS = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx_bindings"}
INSTALL_HINT = {
    "tensorrt": "pip install 'tensorrt>=10.12' on a machine with an NVIDIA GPU and driver",
    "tensorrt-rtx": "pip install tensorrt-rtx-cu13-libs tensorrt-rtx-cu13-bindings",
}
# Plugin-only fields (plugins/tensorrt/asa_trt_plugin.h Config): which optional inputs are wired,
# bit s - 3 for contract slot s (kHasMask ... kHasGateK).
_OPTIONAL_BITS = {slot: 1 << (slot - 3) for slot in range(3, len(contract.INPUTS))}
# Registry handles of loaded plugin libraries: a library is registered once per process and
# stays registered (TensorRT keeps pointers to its creators).
_LOADED: dict[tuple[str, str], object] = {}


@dataclasses.dataclass(frozen=True)
class Profile:
    """Optimization profile of one input: min / opt / max shapes (all dims concrete).

    Args:
        min: smallest shape the engine accepts.
        opt: shape the builder tunes for.
        max: largest shape the engine accepts.
    """

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


# ---------------------------------------------------------------------------- library loading

def import_tensorrt(backend: str = "tensorrt"):
    """Import the TensorRT Python bindings of `backend`, or explain how to get them.

    Args:
        backend: "tensorrt" or "tensorrt-rtx".

    Returns:
        The bindings module.

    Raises:
        AsaExportError: unknown backend, or the bindings cannot be imported.
    """
    if backend not in BACKENDS:
        raise AsaExportError(f"unknown TensorRT backend {backend!r}: choose {', '.join(BACKENDS)}")
    import importlib

    try:
        return importlib.import_module(BACKENDS[backend])
    except Exception as exc:  # ImportError, or OSError from a wheel without its libraries
        raise AsaExportError(
            f"building an engine needs {backend} ({type(exc).__name__}: {exc}). Install it: "
            f"{INSTALL_HINT[backend]}. Without TensorRT, `asa-export model.onnx --out "
            "model.asa.onnx` writes the rewritten ONNX model (runs in ONNX Runtime)."
        ) from None


def plugin_library_path(library: str | os.PathLike | None = None) -> Path:
    """The ASA TensorRT plugin library to load.

    Args:
        library: explicit path; else $ASA_TRT_PLUGIN; else the default build folders.

    Returns:
        Absolute path of an existing libasa_trt.so.

    Raises:
        AsaExportError: the given path does not exist, or none was found.
    """
    given = library or os.environ.get(ENV_VAR)
    if given:
        path = Path(given).expanduser().resolve()
        if not path.is_file():
            raise AsaExportError(f"TensorRT plugin library {path} does not exist")
        return _shared_library(path)
    for path in _DEFAULT_LOCATIONS:
        if path.is_file():
            return _shared_library(path)
    raise AsaExportError(
        f"the ASA TensorRT plugin ({LIBRARY_NAME}) was not found: build it with "
        f"`python tools/build_trt_plugin.py` (needs nvcc), or pass its path (--plugin-library "
        f"or ${ENV_VAR})"
    )


def _shared_library(path: Path) -> Path:
    """Refuse a file that is no ELF shared object before TensorRT sees it (fails fast, before
    a long rewrite; TensorRT itself only logs that it could not load a library)."""
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != b"\x7fELF":
        raise AsaExportError(
            f"TensorRT plugin library {path} is not a shared library (no ELF header); pass the "
            f"{LIBRARY_NAME} built by `python tools/build_trt_plugin.py`"
        )
    return path


def rtx_loader_dir() -> Path | None:
    """Folder with the `libtensorrt_rtx.so` link that TensorRT-RTX's parser dlopens.

    The TensorRT-RTX wheel ships only `libtensorrt_rtx.so.1`; the ONNX parser opens the
    unversioned name when it adds a plugin layer, and aborts the process when it cannot. The link
    is made in a cache folder; that folder must be on LD_LIBRARY_PATH when the process starts.

    Returns:
        The folder, or None when the TensorRT-RTX libraries are not installed.
    """
    import importlib.util

    spec = importlib.util.find_spec("tensorrt_rtx_libs")
    if spec is None or not spec.origin:
        return None
    target = Path(spec.origin).parent / "libtensorrt_rtx.so.1"
    if not target.is_file():
        return None
    # One folder per installation: two environments (a venv beside the system Python) must not
    # share a link, or the parser would load the other environment's library.
    tag = hashlib.sha1(str(target.resolve()).encode()).hexdigest()[:10]
    folder = Path(tempfile.gettempdir()) / f"asa_export_rtx_{os.getuid()}_{tag}"
    folder.mkdir(exist_ok=True)
    link = folder / "libtensorrt_rtx.so"
    if not link.exists():
        tmp = folder / f".link{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target)
        os.replace(tmp, link)
    return folder


def _check_rtx_loader() -> None:
    folder = rtx_loader_dir()
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(":") if d]
    if any((Path(d) / "libtensorrt_rtx.so").exists() for d in dirs):
        return
    raise AsaExportError(
        "TensorRT-RTX's parser needs libtensorrt_rtx.so on LD_LIBRARY_PATH (the wheel ships only "
        f"libtensorrt_rtx.so.1; without the link the process aborts). Run with "
        f"LD_LIBRARY_PATH={folder}:$LD_LIBRARY_PATH"
    )


def load_plugin(trt, library: Path):
    """Register libasa_trt.so's creators with TensorRT and check ours is among them.

    Returns:
        The registry handle of the library (keep it alive while TensorRT uses the plugin).

    Raises:
        AsaExportError: the library does not load, or registers no AdaptiveSparseAttention
            creator of namespace "asa" and version "1" (a wrong or stale library).
    """
    key = (trt.__name__, str(Path(library).resolve()))
    if key in _LOADED:
        return _LOADED[key]
    registry = trt.get_plugin_registry()
    try:
        handle = registry.load_library(str(library))
    except Exception as exc:
        raise AsaExportError(f"TensorRT could not load the plugin library {library}: {exc}") from None
    if handle is None:  # TensorRT(-RTX) logs the cause and returns no handle: no exception
        raise AsaExportError(
            f"TensorRT could not load the plugin library {library}: it is not a TensorRT plugin "
            "library of this platform and ABI (dlopen failed, or no getCreators export); rebuild "
            "it with `python tools/build_trt_plugin.py`"
        )
    creator = registry.get_creator(contract.OP_TYPE, contract.PLUGIN_VERSION,
                                   contract.PLUGIN_NAMESPACE)
    if creator is None:
        raise AsaExportError(
            f"{library} registers no {contract.OP_TYPE} plugin (namespace "
            f"{contract.PLUGIN_NAMESPACE!r}, version {contract.PLUGIN_VERSION!r}); rebuild it with "
            "`python tools/build_trt_plugin.py`"
        )
    _LOADED[key] = handle
    return handle


# ------------------------------------------------------------------------------ engine copy

def prepare_for_engine(model: ir.Model, precision: str = "fp16") -> int:
    """Turn a rewritten model, in place, into the copy the TensorRT parser reads.

    Strips the ASA model-local functions (and the nodes' overload names); drops empty optional
    inputs and records which are present in the plugin field `optional_inputs`; names unnamed
    telemetry outputs and records their count in `telemetry_outputs`; converts precision.

    Args:
        model: the rewritten model (modified in place).
        precision: "fp32", "fp16" or "bf16".

    Returns:
        The number of ASA nodes.

    Raises:
        AsaExportError: the model has no ASA node, or the precision is unsupported.
    """
    from asa_export.passes.precision import check_precision, convert_precision

    check_precision(precision)
    nodes = asa_nodes(model)
    if not nodes:
        raise AsaExportError(
            "the model has no AdaptiveSparseAttention nodes: nothing for the plugin to run. Give "
            "asa-export the original model (it rewrites first), or check `asa-export inspect` "
            "for why no attention site matched"
        )
    for key in [k for k in model.functions if k[0] == contract.DOMAIN]:
        del model.functions[key]
    convert_precision(model, precision)  # before the slots move: it reads contract positions
    for node in nodes:
        node.overload = ""
        _explicit_slots(node)
    return len(nodes)


def _explicit_slots(node: ir.Node) -> None:
    """Empty optional inputs become absent (TensorRT would pass null tensors); the plugin learns
    which slots are wired from `optional_inputs`, and its output count from `telemetry_outputs`."""
    kept = [v for v in node.inputs if v is not None]
    present = [i for i, v in enumerate(node.inputs) if v is not None]
    if present[:3] != [0, 1, 2]:
        raise AsaExportError(f"ASA node {node.name!r} lacks query, key or value")
    for i, value in enumerate(kept):
        node.replace_input_with(i, value)
    node.resize_inputs(len(kept))
    _set_int(node, "optional_inputs", sum(_OPTIONAL_BITS[i] for i in present[3:]))
    for i, out in enumerate(node.outputs):
        if not out.name:
            out.name = f"{node.name}/{contract.OUTPUTS[i]}"
    _set_int(node, "telemetry_outputs", len(node.outputs) - 1)


def _set_int(node: ir.Node, name: str, value: int) -> None:
    node.attributes[name] = ir.AttrInt64(name, value)


# --------------------------------------------------------------------------------- profiles

def parse_shapes(text: str) -> dict[str, tuple[int, ...]]:
    """Parse trtexec-style shapes: "input_ids:1x128,attention_mask:1x128".

    Raises:
        AsaExportError: malformed text.
    """
    shapes = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, sep, dims = item.rpartition(":")
        if not sep or not name or not re.fullmatch(r"\d+(x\d+)*", dims):
            raise AsaExportError(f"bad shape {item!r}: write NAME:DxDxD, e.g. input_ids:1x128")
        shapes[name] = tuple(int(d) for d in dims.split("x"))
    return shapes


def make_profiles(model: ir.Model, *, min_shapes=None, opt_shapes=None, max_shapes=None,
                  max_seq: int | None = None, max_batch: int = 1) -> dict[str, Profile]:
    """One optimization profile for the model's inputs.

    Explicit shapes win; other inputs' dynamic dims get batch 1..max_batch (first dim) and
    sequence 1..max_seq (every other dynamic dim), tuned for half of each maximum.

    Args:
        model: the model whose graph inputs need shapes.
        min_shapes, opt_shapes, max_shapes: {input: shape} (see parse_shapes), all three for an
            input or none.
        max_seq: largest sequence length for dims not given explicitly.
        max_batch: largest batch for dims not given explicitly.

    Returns:
        {input name: Profile}.

    Raises:
        AsaExportError: a dynamic input without shapes and no max_seq, an unknown input name,
            shapes that contradict the model or min <= opt <= max.
    """
    given = [s or {} for s in (min_shapes, opt_shapes, max_shapes)]
    names = {v.name for v in model.graph.inputs}
    for name in set().union(*given) - names:
        raise AsaExportError(f"shape given for {name!r}, which is not a model input "
                             f"(inputs: {', '.join(sorted(names))})")
    if max_seq is not None:
        _check_fixed_sequence(model, max_seq)
    profiles = {}
    for value in model.graph.inputs:
        dims = list(value.shape.dims) if value.shape is not None else None
        if dims is None:
            raise AsaExportError(f"input {value.name!r} has no known rank; give its shapes")
        if any(value.name in g for g in given):
            profile = _explicit_profile(value.name, given)
        else:
            profile = _default_profile(value.name, dims, max_seq, max_batch)
        _check_profile(value.name, dims, profile)
        profiles[value.name] = profile
    return profiles


def _check_fixed_sequence(model: ir.Model, max_seq: int) -> None:
    """--max-seq below a sequence axis the model fixes cannot be honoured: say so.

    Only axes whose role is known are checked (token ids, padding masks and positions: axis 1;
    past key/value: axis 2), so a hidden size above max_seq is never mistaken for a length.
    """
    from asa_export.inputs import input_roles

    if max_seq < 1:
        raise AsaExportError(f"--max-seq must be at least 1, got {max_seq}")
    axes = {"tokens": 1, "padding_mask": 1, "positions": 1, "past": 2}
    for role in input_roles(model):
        axis = axes.get(role.role)
        if axis is None or len(role.shape) <= axis:
            continue
        fixed = role.shape[axis]
        if isinstance(fixed, int) and fixed > max_seq:
            raise AsaExportError(
                f"input {role.name!r} fixes its sequence length at {fixed} (axis {axis}), above "
                f"--max-seq {max_seq}: the engine could only take {fixed}. Raise --max-seq, or "
                "export the model with a dynamic sequence axis"
            )


def _explicit_profile(name: str, given) -> Profile:
    if not all(name in g for g in given):
        raise AsaExportError(f"input {name!r}: give its min, opt and max shapes together")
    return Profile(*(tuple(g[name]) for g in given))


def _default_profile(name: str, dims, max_seq, max_batch) -> Profile:
    lo, opt, hi = [], [], []
    for i, d in enumerate(dims):
        if isinstance(d, int):
            lo.append(d), opt.append(d), hi.append(d)
            continue
        top = max_batch if i == 0 else max_seq
        if top is None:
            raise AsaExportError(
                f"input {name!r} has a dynamic dimension {d or '?'} (axis {i}): give --max-seq "
                "or --min-shapes/--opt-shapes/--max-shapes"
            )
        lo.append(1), opt.append(max(1, (top + 1) // 2)), hi.append(top)
    return Profile(tuple(lo), tuple(opt), tuple(hi))


def _check_profile(name: str, dims, p: Profile) -> None:
    if not len(p.min) == len(p.opt) == len(p.max) == len(dims):
        raise AsaExportError(f"input {name!r}: shapes must have rank {len(dims)}")
    for axis, d in enumerate(dims):
        lo, opt, hi = p.min[axis], p.opt[axis], p.max[axis]
        if not 0 <= lo <= opt <= hi:
            raise AsaExportError(f"input {name!r} axis {axis}: need min <= opt <= max, got "
                                 f"{lo}, {opt}, {hi}")
        if isinstance(d, int) and not lo == hi == d:
            raise AsaExportError(f"input {name!r} axis {axis} is fixed at {d} in the model, "
                                 f"the shapes say {lo}..{hi}")


def check_shapes_in_profile(profiles: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise AsaExportError when a runtime input shape falls outside the engine's profile.

    Args:
        profiles: {input: {"min": [...], "max": [...]}} as in the engine's JSON sidecar.
        shapes: {input: shape} of the tensors about to be fed.
    """
    for name, shape in shapes.items():
        p = profiles.get(name)
        if p is None:
            raise AsaExportError(f"the engine has no input {name!r}")
        if len(shape) != len(p["min"]) or any(
                not lo <= s <= hi for s, lo, hi in zip(shape, p["min"], p["max"])):
            raise AsaExportError(
                f"input {name!r} has shape {tuple(shape)}, outside the engine's profile "
                f"{tuple(p['min'])}..{tuple(p['max'])}; rebuild with larger --max-shapes/--max-seq"
            )


# ------------------------------------------------------------------------------------ build

def _logger(trt):
    import logging

    log = logging.getLogger(__name__)

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity <= trt.ILogger.Severity.ERROR:
                self.errors.append(msg)
                log.error("%s", msg)
            elif severity == trt.ILogger.Severity.WARNING:
                log.warning("%s", msg)
            else:
                log.debug("%s", msg)

    return _Logger()


def _progress_monitor(trt, progress: Callable[[str], None]):
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class _Monitor(base):
        def __init__(self):
            base.__init__(self)

        def phase_start(self, phase_name, parent_phase, num_steps):
            progress(f"build: {phase_name} ({num_steps} steps)")

        def step_complete(self, phase_name, step):
            return True

        def phase_finish(self, phase_name):
            pass

    return _Monitor()


def _parse(trt, builder, logger, onnx_file: Path, expected: int):
    flags = 0
    if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise AsaExportError("TensorRT's ONNX parser rejected the model:\n  " + "\n  ".join(errors))
    plugins = [network.get_layer(i) for i in range(network.num_layers)
               if network.get_layer(i).type == trt.LayerType.PLUGIN_V3]
    if len(plugins) != expected:
        raise AsaExportError(f"{len(plugins)} of {expected} ASA nodes became plugin layers")
    return network, parser


def _config(trt, builder, profiles: dict[str, Profile], target: str | None, library: Path,
            embed_plugin: bool, progress):
    config = builder.create_builder_config()
    profile = builder.create_optimization_profile()
    for name, p in profiles.items():
        profile.set_shape(name, p.min, p.opt, p.max)
    config.add_optimization_profile(profile)
    if target:
        capability = getattr(getattr(trt, "ComputeCapability", None), target.upper(), None)
        if capability is None:
            raise AsaExportError(f"this TensorRT cannot target {target!r} ahead of time")
        config.num_compute_capabilities = 1
        config.set_compute_capability(capability, 0)
    if embed_plugin:
        config.plugins_to_serialize = [str(library)]
    if progress is not None:
        monitor = _progress_monitor(trt, progress)
        if monitor is not None:
            config.progress_monitor = monitor
    return config


def build_engine(onnx_path: str | os.PathLike, engine_path: str | os.PathLike, *,
                 precision: str = "fp16", min_shapes=None, opt_shapes=None, max_shapes=None,
                 max_seq: int | None = None, max_batch: int = 1,
                 plugin_library: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None, backend: str = "tensorrt",
                 target: str | None = None, embed_plugin: bool = True) -> Path:
    """Build a TensorRT engine from a rewritten model (see the module doc for the steps).

    Args:
        onnx_path: model with AdaptiveSparseAttention nodes (`asa-export ... --out x.asa.onnx`).
        engine_path: the .plan to write; `<engine_path>.json` beside it is the sidecar.
        precision: "fp16", "bf16" or "fp32" (the graph is converted; networks are strongly typed).
        min_shapes, opt_shapes, max_shapes: {input: shape} (parse_shapes) for explicit profiles.
        max_seq: largest sequence length for other dynamic dims; max_batch: largest batch.
        plugin_library: libasa_trt.so (default: plugin_library_path()).
        progress: called with one-line progress messages.
        backend: "tensorrt" or "tensorrt-rtx".
        target: ahead-of-time compute capability (TensorRT-RTX), e.g. "SM89"; None = this GPU.
        embed_plugin: serialize the plugin library into the engine (a service needs only the
            engine file).

    Returns:
        The engine path.

    Raises:
        AsaExportError: TensorRT or the plugin missing, a model without ASA nodes, bad shapes or
            precision, a parser or builder failure. Nothing is written then.
    """
    say = progress or (lambda message: None)
    trt = import_tensorrt(backend)
    if backend == "tensorrt-rtx":
        _check_rtx_loader()
    library = plugin_library_path(plugin_library)
    engine_path = Path(engine_path).expanduser().resolve()
    sidecar = engine_path.with_name(engine_path.name + ".json")
    for path in (engine_path, sidecar):
        io.check_output_path(path, inputs=[os.path.abspath(onnx_path)])
    model = io.load_model(onnx_path)
    say(f"preparing the engine copy ({precision})")
    count = prepare_for_engine(model, precision)
    profiles = make_profiles(model, min_shapes=min_shapes, opt_shapes=opt_shapes,
                             max_shapes=max_shapes, max_seq=max_seq, max_batch=max_batch)
    handle = load_plugin(trt, library)  # noqa: F841 -- keeps the library registered
    logger = _logger(trt)
    with tempfile.TemporaryDirectory(prefix="asa_trt_") as tmp:
        copy = Path(tmp) / "engine_copy.onnx"
        io.save_model(model, copy)
        builder = trt.Builder(logger)
        say(f"parsing ({count} ASA nodes -> plugin {contract.PLUGIN_NAMESPACE}::{contract.OP_TYPE})")
        network, _parser = _parse(trt, builder, logger, copy, count)
        config = _config(trt, builder, profiles, target, library, embed_plugin, progress)
        say("building the engine")
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise AsaExportError("TensorRT could not build the engine:\n  " + "\n  ".join(logger.errors))
    info = _sidecar(trt, backend, precision, target, profiles, library, embed_plugin, count,
                    onnx_path)
    _write_atomically(engine_path, bytes(plan), sidecar, json.dumps(info, indent=2) + "\n")
    say(f"wrote {engine_path} ({len(bytes(plan)) / 2**20:.1f} MiB) and {sidecar.name}")
    return engine_path


def _sidecar(trt, backend, precision, target, profiles, library: Path, embedded, count, source):
    return {
        "format": "asa_export.engine/1",
        "tensorrt": {"backend": backend, "version": getattr(trt, "__version__", "unknown")},
        "target": target or "the build machine's GPU",
        "precision": precision,
        "profiles": {n: dataclasses.asdict(p) for n, p in profiles.items()},
        "plugin": {
            "name": contract.OP_TYPE, "namespace": contract.PLUGIN_NAMESPACE,
            "version": contract.PLUGIN_VERSION, "library": str(library),
            "sha256": hashlib.sha256(library.read_bytes()).hexdigest(), "embedded": embedded,
        },
        "asa_nodes": count,
        "source": os.path.abspath(source),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_atomically(engine: Path, plan: bytes, sidecar: Path, text: str) -> None:
    """Both files go to temporaries beside their targets; the sidecar is renamed first, then
    the engine (an engine is never left without its sidecar)."""
    with io.atomic_path(engine) as engine_tmp, io.atomic_path(sidecar) as sidecar_tmp:
        Path(engine_tmp).write_bytes(plan)
        Path(sidecar_tmp).write_text(text, encoding="utf-8")


def load_engine(engine_path: str | os.PathLike, *, plugin_library=None, backend="tensorrt"):
    """Deserialize an engine for a service (needs the engine's GPU).

    Args:
        engine_path: the .plan.
        plugin_library: libasa_trt.so; None loads it from the default places when found, else
            relies on the copy embedded in the engine.
        backend: "tensorrt" or "tensorrt-rtx".

    Returns:
        (runtime, engine); keep the runtime alive as long as the engine.

    Raises:
        AsaExportError: TensorRT missing, or the engine does not deserialize here.
    """
    trt = import_tensorrt(backend)
    logger = _logger(trt)
    runtime = trt.Runtime(logger)
    try:
        library = plugin_library_path(plugin_library)
    except AsaExportError:
        if plugin_library:
            raise
        library = None
    if library is not None:
        load_plugin(trt, library)
    else:
        runtime.engine_host_code_allowed = True  # run the plugin library embedded in the engine
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise AsaExportError(f"{engine_path} does not deserialize here:\n  " +
                             "\n  ".join(logger.errors))
    return runtime, engine
