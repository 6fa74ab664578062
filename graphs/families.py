"""Model families: tiny seeded random-weight transformers configs, and the real SmolLM2-135M.

Each tiny family is a real transformers architecture at a size that exports in seconds:
2 layers, hidden 128, 8 query heads / 2 KV heads of dim 16 where the family has GQA. Weights
come from the family's own initializer under a fixed seed, so two processes build identical
models. `initializer_range` is raised from 0.02 to 0.2 so that attention is peaked rather than
near-uniform (with 0.02 every score is ~0 and sparse/dense comparisons would prove nothing).
"""

from __future__ import annotations

import dataclasses
import functools

from asa_export.errors import AsaExportError

FAMILIES = ("llama", "mistral", "qwen2", "gpt2", "bert", "smollm2")
# Families whose graphs are causal decoders with a KV cache; bert is the bidirectional one.
DECODERS = ("llama", "mistral", "qwen2", "gpt2", "smollm2", "llama_demo")
ATTN_IMPLEMENTATIONS = ("eager", "sdpa")
SEED = 0
# Mistral's window is small so that it masks keys at the test lengths (~100 tokens).
MISTRAL_WINDOW = 48

_LLAMA_LIKE = dict(
    vocab_size=256,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=1024,
    initializer_range=0.2,
)

# family -> (transformers config class name, model class name, config kwargs)
_TINY = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(_LLAMA_LIKE)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(_LLAMA_LIKE, sliding_window=MISTRAL_WINDOW)),
    # Qwen2 has q/k/v bias built in; its config carries sliding_window=4096 but
    # use_sliding_window=False, i.e. full attention (the default of the released models).
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(_LLAMA_LIKE)),
    "gpt2": (
        "GPT2Config",
        "GPT2LMHeadModel",
        dict(vocab_size=256, n_embd=128, n_layer=2, n_head=8, n_positions=1024, initializer_range=0.2,
             bos_token_id=0, eos_token_id=0),
    ),
    "bert": (
        "BertConfig",
        "BertModel",
        dict(vocab_size=256, hidden_size=128, num_hidden_layers=2, num_attention_heads=8,
             intermediate_size=256, max_position_embeddings=1024, initializer_range=0.2),
    ),
    # The model behind graphs.default_model(): a bit bigger, still exports in seconds.
    "llama_demo": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
             num_attention_heads=8, num_key_value_heads=2, head_dim=32,
             max_position_embeddings=8192, initializer_range=0.2),
    ),
}


@dataclasses.dataclass(frozen=True)
class FamilySpec:
    """Shapes of a family that input builders need, without building the model.

    Args:
        family: family name.
        causal: True for decoders (left padding, KV cache possible), False for bert.
        num_layers: transformer layers (one past key and value per layer).
        num_heads: query heads.
        num_kv_heads: key/value heads.
        head_dim: per-head dimension.
        vocab_size: token ids are drawn below this.
        window: sliding window in keys, None for full attention.
    """

    family: str
    causal: bool
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    window: int | None = None


def check_family(family: str) -> None:
    """Raise AsaExportError unless `family` is a known family (or the private demo family)."""
    if family not in FAMILIES and family not in _TINY:
        raise AsaExportError(f"unknown model family {family!r}; choose one of {', '.join(FAMILIES)}")


def check_attn(attn: str) -> None:
    """Raise AsaExportError unless `attn` is a transformers attention implementation we export."""
    if attn not in ATTN_IMPLEMENTATIONS:
        raise AsaExportError(f"unknown attn_implementation {attn!r}; choose one of {ATTN_IMPLEMENTATIONS}")


def tiny_config(family: str, attn_implementation: str = "eager"):
    """Build the transformers config of a tiny family.

    Args:
        family: one of the tiny families (not smollm2).
        attn_implementation: "eager" or "sdpa".

    Returns:
        A transformers PretrainedConfig.
    """
    import transformers

    check_attn(attn_implementation)
    config_cls, _, kwargs = _TINY[family]
    config = getattr(transformers, config_cls)(**kwargs)
    config._attn_implementation = attn_implementation
    return config


def build_model(family: str, attn_implementation: str = "eager"):
    """Build a family's torch model in eval mode (tiny: seeded random weights; smollm2: real).

    Args:
        family: one of FAMILIES.
        attn_implementation: "eager" or "sdpa" (transformers' attention code path).

    Returns:
        (model, config): the transformers model (fp32, eval mode) and its config.
    """
    import torch
    import transformers

    check_family(family)
    check_attn(attn_implementation)
    if family == "smollm2":
        from graphs import smollm2

        model = smollm2.load_model(attn_implementation)
        return model, model.config
    config = tiny_config(family, attn_implementation)
    model_cls = getattr(transformers, _TINY[family][1])
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_cls(config, add_pooling_layer=False) if family == "bert" else model_cls(config)
    model.eval()
    return model, config


@functools.lru_cache(maxsize=None)
def family_spec(family: str) -> FamilySpec:
    """Shapes of a family, read from its config (smollm2: from the GGUF metadata).

    Args:
        family: one of FAMILIES.

    Returns:
        FamilySpec.
    """
    check_family(family)
    if family == "smollm2":
        from graphs import smollm2

        return smollm2.spec()
    config = tiny_config(family)
    if family == "gpt2":
        return FamilySpec(family, True, config.n_layer, config.n_head, config.n_head,
                          config.n_embd // config.n_head, config.vocab_size)
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return FamilySpec(
        family,
        family in DECODERS,
        config.num_hidden_layers,
        config.num_attention_heads,
        kv_heads,
        head_dim,
        config.vocab_size,
        getattr(config, "sliding_window", None),
    )
