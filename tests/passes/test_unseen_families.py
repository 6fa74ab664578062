"""Families the issue does not name, tried as a new user would: tiny random configs from
transformers' own classes, exported with dynamo through graphs' Llama-shaped interface, rewritten
at tau = 1. The matcher knows none of them; each exercises a different shape of attention."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import graphs
from asa_export.passes.pipeline import RewriteOptions, rewrite_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

WINDOW = 48
COMMON = dict(vocab_size=graphs.family_spec("llama").vocab_size, hidden_size=64,
              num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              max_position_embeddings=512, initializer_range=0.2)
# family -> (config overrides, attention implementation, what it exercises)
UNSEEN = {
    "phi3": (dict(num_key_value_heads=2, pad_token_id=0), "sdpa", "fused qkv projection, GQA"),
    "gpt_neox": (dict(), "sdpa", "partial rotary, fused qkv, MHA"),
    "falcon": (dict(new_decoder_architecture=False, multi_query=True), "sdpa", "MQA (1 KV head)"),
    "opt": (dict(ffn_dim=128, word_embed_proj_dim=64), "sdpa", "scale folded into q_proj"),
    "gemma2": (dict(num_key_value_heads=2, head_dim=16, sliding_window=WINDOW,
                    attn_logit_softcapping=50.0,
                    layer_types=["sliding_attention", "full_attention"]),
               "eager", "logit soft-cap, alternating sliding window"),
}


@pytest.fixture(scope="module", params=sorted(UNSEEN))
def exported(request, tmp_path_factory):
    family = request.param
    overrides, attn, _ = UNSEEN[family]
    config = transformers.AutoConfig.for_model(family, **COMMON, **overrides)
    config._attn_implementation = attn
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
    path = tmp_path_factory.mktemp(family) / f"{family}.onnx"
    graphs.export_to(path, "llama", "dynamo", attn=attn, model=model)
    return family, path


def test_unseen_family_is_rewritten_with_parity(exported):
    family, path = exported
    model = ir.load(path)
    report = rewrite_model(model, RewriteOptions(threshold=1.0))
    assert len(report.sites) == COMMON["num_hidden_layers"] and report.rejected == []
    if family == "falcon":
        assert {s.kv_heads for s in report.sites} == {1}
    if family == "gemma2":
        assert [s.window for s in report.sites] == [WINDOW, -1]
        assert [s.softcap for s in report.sites] == pytest.approx([50.0, 50.0])
    rewritten = ir.serde.serialize_model(model).SerializeToString()
    original = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    new = ort.InferenceSession(rewritten, providers=["CPUExecutionProvider"])
    window = WINDOW if family == "gemma2" else None
    for plan in (dict(batch=2, seq=150), dict(batch=3, seq=70, pad="right")):
        feeds = graphs.sample_inputs("llama", path, **plan)
        rows = graphs.visible_rows(feeds["attention_mask"], plan["seq"], True, window)
        expected, actual = original.run(None, feeds)[0], new.run(None, feeds)[0]
        np.testing.assert_allclose(actual[rows], expected[rows], atol=1e-4, rtol=1e-3)
