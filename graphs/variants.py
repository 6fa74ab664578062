"""Which (family, exporter, attn, kv_cache) variants export here, as recorded by `probe()`.

Recorded on torch 2.13.0+cpu, transformers 5.24.0, onnxscript 0.7.2, onnxruntime 1.32.0:
every tiny candidate exported and matched PyTorch; the SmolLM2 candidates are a subset (each
export is 40-90 s and 650 MB), all of which exported. tests/graphs re-checks every entry:
VARIANTS must export and match, REFUSED must still fail with the recorded reason.
"""

from __future__ import annotations

import itertools

from graphs.exporters import EXPORTERS
from graphs.families import ATTN_IMPLEMENTATIONS, FAMILIES

KV_FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
# SmolLM2: one export per exporter with sdpa (the transformers default), the TorchScript one with
# a KV cache; the rest of its matrix is covered by the tiny llama, the same architecture. (The
# probe also exported ("torchscript", "eager", False) and ("dynamo", "eager", True) here; they
# are left out of CI for time: 40-160 s each.)
SMOLLM2_CANDIDATES = [
    ("smollm2", "torchscript", "sdpa", True),
    ("smollm2", "dynamo", "sdpa", False),
    ("smollm2", "dynamo23", "sdpa", False),
]


def _tiny_candidates():
    out = []
    for family, exporter, attn in itertools.product(FAMILIES, EXPORTERS, ATTN_IMPLEMENTATIONS):
        if family == "smollm2":
            continue
        out.append((family, exporter, attn, False))
        if family in KV_FAMILIES:
            out.append((family, exporter, attn, True))
    return out


CANDIDATES = _tiny_candidates() + SMOLLM2_CANDIDATES
# (variant, reason): the exporter's error text, for variants that fail to export here.
REFUSED: list[tuple[tuple[str, str, str, bool], str]] = []
_REFUSED_SET = {variant for variant, _ in REFUSED}
VARIANTS = [v for v in CANDIDATES if v not in _REFUSED_SET]
# Variants whose test takes over a minute (SmolLM2: load + 40-90 s export + 30-layer parity).
SLOW = [v for v in VARIANTS if v[0] == "smollm2"]


def failure_reason(err: BaseException) -> str:
    """One line naming an export failure: the root cause's type and first message line.

    The dynamo exporter wraps the real error (e.g. a torch._dynamo UserError) in a
    TorchExportError whose own text is generic advice, so the innermost cause is reported.

    Args:
        err: the exception raised by the exporter.

    Returns:
        "OuterType <- RootType: first line".
    """
    root = err
    while root.__cause__ is not None or root.__context__ is not None:
        root = root.__cause__ or root.__context__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    chain = type(err).__name__ if root is err else f"{type(err).__name__} <- {type(root).__name__}"
    return f"{chain}: {lines[0] if lines else ''}"


def probe(candidates=None, out_dir=None):
    """Try to export each candidate (uncached) and collect the failures with their reasons.

    Used to fill REFUSED when versions change; `python -m graphs --probe` runs it.

    Args:
        candidates: variants to try (default CANDIDATES).
        out_dir: folder for the trial exports (default a temporary folder, removed after).

    Returns:
        (ok, refused): list of variants, list of (variant, "ErrorType: last line of message").
    """
    import pathlib
    import tempfile

    from graphs.exporters import export_to

    ok, refused = [], []
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        for variant in candidates or CANDIDATES:
            family, exporter, attn, kv_cache = variant
            path = pathlib.Path(tmp) / "probe.onnx"
            try:
                export_to(path, family, exporter, attn=attn, kv_cache=kv_cache)
            except Exception as err:  # any exporter failure is a result to record, not a crash
                refused.append((variant, failure_reason(err)))
            else:
                ok.append(variant)
            path.unlink(missing_ok=True)
    return ok, refused
