"""ONNX exporters of the families, with the on-disk cache, and the torch reference run.

Exporters (see README.md for what each produces here):
  torchscript  torch.onnx.export(dynamo=False), opset 17 (the tracer; needs attention_mask)
  dynamo       torch.onnx.export(dynamo=True),  opset 18
  dynamo23     torch.onnx.export(dynamo=True),  opset 23 (sdpa becomes the ONNX Attention op)
"""

from __future__ import annotations

import os
import pathlib

from asa_export.errors import AsaExportError
from graphs import cache
from graphs.families import build_model, check_attn, check_family, family_spec
from graphs.inputs import sample_inputs
from graphs.interface import BATCH, PAST, SEQ, TOTAL, dynamic_axes, io_names

EXPORTERS = ("torchscript", "dynamo", "dynamo23")
OPSETS = {"torchscript": 17, "dynamo": 18, "dynamo23": 23}
# Trace shapes: distinct, none 0 or 1, so no dimension gets specialized or unified by accident.
_TRACE_BATCH, _TRACE_SEQ, _TRACE_KV_SEQ, _TRACE_PAST = 2, 16, 5, 11


def check_exporter(exporter: str) -> None:
    """Raise AsaExportError unless `exporter` is one of EXPORTERS."""
    if exporter not in EXPORTERS:
        raise AsaExportError(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")


def wrapped_model(family: str, attn: str = "eager", kv_cache: bool = False, model=None):
    """The flat-interface torch module that is exported (and used as the parity reference).

    Args:
        family: one of FAMILIES.
        attn: "eager" or "sdpa".
        kv_cache: past/present tensors in the interface (decoders only).
        model: an already built transformers model of this family and attn, to reuse.

    Returns:
        torch.nn.Module in eval mode.
    """
    from graphs.wrappers import wrap

    spec = family_spec(family)
    if kv_cache and not spec.causal:
        raise AsaExportError(f"{family} is bidirectional; it has no KV-cache variant")
    if model is None:
        model, _ = build_model(family, attn)
    return wrap(model, spec.causal, spec.num_layers, kv_cache)


def _trace_args(family: str, kv_cache: bool):
    """Example inputs (torch tensors, in signature order) for tracing, left/right padded."""
    import torch

    seq, past = (_TRACE_KV_SEQ, _TRACE_PAST) if kv_cache else (_TRACE_SEQ, 0)
    variant = (family, "torchscript", "eager", kv_cache)
    feeds = sample_inputs(family, variant, batch=_TRACE_BATCH, seq=seq, past=past)
    return [torch.from_numpy(v) for v in feeds.values()]


def _dynamo_shapes(names: list[str], axes: dict[str, dict[int, str]], causal: bool):
    """dynamic_shapes in the wrapper's argument structure: past tensors, when present, form one
    *args tuple (torch.export drops the empty one)."""
    import torch

    dims = {n: torch.export.Dim(n) for n in (BATCH, SEQ, PAST, TOTAL)}
    per_input = [{axis: dims[dim] for axis, dim in axes[n].items()} for n in names]
    if len(per_input) <= 3:
        return tuple(per_input)
    return (*per_input[:3], tuple(per_input[3:]))


def export_to(path: os.PathLike, family: str, exporter: str, *, attn: str = "eager",
              kv_cache: bool = False, model=None) -> pathlib.Path:
    """Export one variant to `path`, uncached; exporter errors propagate unchanged.

    Args:
        path: output file (weights inline).
        family: one of FAMILIES.
        exporter: one of EXPORTERS.
        attn: "eager" or "sdpa".
        kv_cache: add past/present tensors (decoders).
        model: optional prebuilt transformers model of this family and attn.

    Returns:
        Path of the written file.
    """
    import torch

    check_family(family)
    check_exporter(exporter)
    check_attn(attn)
    spec = family_spec(family)
    module = wrapped_model(family, attn, kv_cache, model)
    names, outputs = io_names(spec.causal, spec.num_layers, kv_cache)
    axes = dynamic_axes(spec.causal, spec.num_layers, kv_cache)
    args = tuple(_trace_args(family, kv_cache))
    path = pathlib.Path(path)
    with torch.no_grad():
        if exporter == "torchscript":
            torch.onnx.export(module, args, str(path), dynamo=False, opset_version=OPSETS[exporter],
                              input_names=names, output_names=outputs, dynamic_axes=axes)
        else:
            torch.onnx.export(module, args, str(path), dynamo=True, opset_version=OPSETS[exporter],
                              input_names=names, output_names=outputs,
                              dynamic_shapes=_dynamo_shapes(names, axes, spec.causal),
                              external_data=False, verbose=False)
    return path


def export(family: str, exporter: str, *, attn: str = "eager", kv_cache: bool = False,
           cache_dir: os.PathLike | None = None) -> pathlib.Path:
    """Export one variant, or return the cached export of it.

    Args:
        family: one of FAMILIES.
        exporter: one of EXPORTERS.
        attn: transformers attn_implementation, "eager" or "sdpa".
        kv_cache: past key/value inputs and present outputs (decoders only).
        cache_dir: cache folder; default `$ASA_GRAPHS_CACHE` or `<repo>/.cache/graphs`.

    Returns:
        Path of the cached ONNX file (weights inline).
    """
    check_family(family)
    check_exporter(exporter)
    check_attn(attn)
    if kv_cache and not family_spec(family).causal:
        raise AsaExportError(f"{family} is bidirectional; it has no KV-cache variant")
    folder = pathlib.Path(cache_dir) if cache_dir is not None else cache.default_cache_dir()
    stem = cache.cache_key(family, exporter, attn, kv_cache)
    return cache.cached_file(folder, stem, lambda tmp: export_to(tmp, family, exporter, attn=attn, kv_cache=kv_cache))


def run_torch(family: str, feeds: dict, *, attn: str = "eager", kv_cache: bool | None = None, model=None):
    """Run the torch model on ONNX-style feeds: the reference for an export's outputs.

    Args:
        family: one of FAMILIES.
        feeds: output of sample_inputs (numpy arrays keyed by input name).
        attn: "eager" or "sdpa".
        kv_cache: whether the feeds carry past tensors; inferred from the names when None.
        model: optional prebuilt transformers model of this family and attn.

    Returns:
        list of np.ndarray in the export's output order.
    """
    import torch

    if kv_cache is None:
        kv_cache = any(n.startswith("past_key_values.") for n in feeds)
    module = wrapped_model(family, attn, kv_cache, model)
    with torch.no_grad():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    out = out if isinstance(out, tuple) else (out,)
    return [t.numpy() for t in out]


def run_onnx(path: os.PathLike, feeds: dict):
    """Run an export on ONNX Runtime's CPU provider.

    Args:
        path: ONNX file.
        feeds: {input name: np.ndarray}.

    Returns:
        list of np.ndarray in the graph's output order.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)
