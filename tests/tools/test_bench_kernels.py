"""tools/bench_kernels.py parts that run without a GPU: kernel names from the profiler, the
printed table (header, decode rows with their batch) and the --decode-batch option."""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import bench_kernels as bench  # noqa: E402


@pytest.mark.parametrize("name,short", [
    # Kernels in an anonymous namespace: the old split on "(" left an empty name for all of
    # them, so --decode-kernels summed every kernel under one key.
    ("void asa::cuda::(anonymous namespace)::select_kernel<float>(AsaParams, "
     "asa::cuda::Workspace, int)", "select_kernel"),
    ("void asa::cuda::(anonymous namespace)::attn_mma_kernel<__nv_bfloat16, 128, 1, true, "
     "true>(AsaParams, asa::cuda::Workspace)", "attn_mma_kernel"),
    ("void asa::cuda::merge_kernel<__half>(AsaParams, asa::cuda::Workspace)", "merge_kernel"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop",
     "cudnn_generated_fort_native_sdpa_sm90_flash_fprop"),
])
def test_short_kernel_name(name, short):
    assert bench.short_kernel_name(name) == short


def decode_row(batch: int, kv: int, ms: float, dense_ms: float) -> dict:
    """A decode row as bench_decode writes it (the fields print_table reads)."""
    return {"kind": "decode", "seq": kv, "batch": batch, "target": 0.1, "density": 0.1,
            "asa_ms": ms, "router_ms": ms / 2, "tok_s": batch / ms * 1e3,
            "dense_tok_s": batch / dense_ms * 1e3, "speedup": dense_ms / ms,
            "dense_ms": {"cudnn_gqa": dense_ms}, "best_dense": "cudnn_gqa", "cached_ms": ms,
            "cached_router_ms": ms / 2, "cached_tok_s": batch / ms * 1e3,
            "cached_speedup": dense_ms / ms, "cached_lists_equal": True,
            "cached_last_pooled_ms": ms, "cached_last_pooled_speedup": dense_ms / ms}


def test_table_names_the_heads_and_each_decode_rows_batch(capsys):
    """The header states this run's heads (it used to say B=1, Hq=32, Hkv=8 whatever the
    arguments), and each decode row its batch (--decode-batch takes several)."""
    args = argparse.Namespace(heads_q=16, heads_kv=4, decode_batch=[1, 4])
    rows = [decode_row(1, 131072, 0.054, 0.184), decode_row(4, 131072, 0.113, 0.686)]
    bench.print_table(rows, "test GPU", args)
    out = capsys.readouterr().out
    assert "Hq=16 Hkv=4" in out
    assert "B 1 KV 131072: cudnn_gqa* 0.184; B 4 KV 131072: cudnn_gqa* 0.686" in out
    table = out[out.index("c.speedup"):].splitlines()[1:3]
    assert [line.split()[:2] for line in table] == [["1", "131072"], ["4", "131072"]]
    assert table[1].split()[5] == "35398"  # tok/s = 4 / 0.113 ms


def test_decode_batch_takes_several_sizes():
    args = bench.build_parser().parse_args(["--decode-batch", "1", "4", "8"])
    assert args.decode_batch == [1, 4, 8]


def test_decode_layers_table_and_option(capsys):
    """--decode-layers L adds a table of the one-call step and the dense call per layer in a
    graph over L K/V copies; L must be at least 1 (1, the default, adds nothing)."""
    parser = bench.build_parser()
    assert parser.parse_args([]).decode_layers == 1
    assert parser.parse_args(["--decode-layers", "8"]).decode_layers == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--decode-layers", "0"])
    args = argparse.Namespace(heads_q=32, heads_kv=8, decode_batch=[1])
    row = decode_row(1, 131072, 0.054, 0.184)
    row.update(layers=8, graph_layers_ms=0.058, graph_layers_dense_ms=0.186,
               graph_layers_speedup=0.186 / 0.058)
    bench.print_table([row, decode_row(1, 32768, 0.03, 0.06)], "test GPU", args)
    out = capsys.readouterr().out
    lines = out[out.index("CUDA graph of 8 layers"):].splitlines()[1:]
    assert lines[0].split() == ["1", "131072", "0.10", "0.058", "0.186", "3.21"]
    assert not lines[1:] or "32768" not in lines[1]  # a row without the layer timing is left out


def test_decode_streams_table_and_option(capsys):
    """--decode-streams adds a table of the router and an attention on two streams, next to each
    alone and in series; rows without those timings are left out."""
    assert bench.build_parser().parse_args(["--decode-streams"]).decode_streams
    assert not bench.build_parser().parse_args([]).decode_streams
    args = argparse.Namespace(heads_q=32, heads_kv=8, decode_batch=[1])
    row = decode_row(1, 131072, 0.054, 0.184)
    row["streams_ms"] = {"router": 0.024, "attention": 0.033, "series": 0.054, "both": 0.050,
                         "both, router high priority": 0.049}
    bench.print_table([row, decode_row(1, 32768, 0.03, 0.06)], "test GPU", args)
    out = capsys.readouterr().out
    lines = out[out.index("two streams (graph replay"):].splitlines()[1:]
    assert lines[0].split() == ["1", "131072", "0.10", "0.024", "0.033", "0.054", "0.050",
                                "0.049"]
    assert not lines[1:] or "32768" not in lines[1]


def test_model_table_gives_eager_and_graph_ratios_to_sdpa(capsys):
    """Model rows: eager and CUDA-graph ms, each with the SDPA row's time over this row's (the
    graph column is nan above --model-graph-max-seq); the header names ASA's host path."""
    assert bench.build_parser().parse_args([]).model_graph_max_seq == 32768
    nan = float("nan")

    def row(seq, config, ms, graph_ms, density):
        return {"kind": "model", "model": "SmolLM2-135M", "seq": seq, "config": config,
                "ms": ms, "graph_ms": graph_ms, "peak_gib": 0.39, "density": density,
                "host_path": "compiled"}

    rows = [row(8192, "sdpa dense", 30.0, 18.4, 1.0), row(8192, "asa 0.4", 40.0, 16.0, 0.38),
            row(131072, "sdpa dense", 1500.0, nan, 1.0), row(131072, "asa 0.1", 300.0, nan, 0.08)]
    bench.print_table(rows, "test GPU", argparse.Namespace(heads_q=32, heads_kv=8))
    out = capsys.readouterr().out
    assert "ASA's host path: compiled" in out
    lines = out[out.index("peak GiB"):].splitlines()[1:5]
    assert lines[1].split() == ["SmolLM2-135M", "8192", "asa", "0.4", "0.38", "40.0", "0.75",
                                "16.0", "1.15", "0.39"]
    assert lines[3].split()[5:9] == ["300.0", "5.00", "nan", "nan"]


def test_model_attention_logs_density_only_when_asked(monkeypatch):
    """The model rows' attention function sums the telemetry only in the untimed forward that
    measures the density (the sums are extra kernels SDPA's timed forward does not run)."""
    counts, vis = torch.tensor([[[2, 3]]]), torch.tensor([[4, 4]])
    monkeypatch.setattr(bench.torch_op, "sparse_attention",
                        lambda q, k, v, attrs: (q, None, counts, vis))
    q = torch.zeros(1, 2, 8, 4)
    assert bench._DENSITY_LOG[0] is None
    out, _ = bench._asa_attention(None, q, q, q, None)
    assert out.shape == (1, 8, 2, 4)
    log: list = []
    monkeypatch.setattr(bench, "_DENSITY_LOG", [log])
    bench._asa_attention(None, q, q, q, None)
    assert [(int(c), int(v)) for c, v in log] == [(5, 8)]


def test_bench_binding_parses_its_arguments():
    """tools/bench_binding.py imports without a GPU (its work starts in main) and takes --seq."""
    import bench_binding
    with pytest.raises(SystemExit) as info:
        bench_binding.main(["--help"])
    assert info.value.code == 0


def test_bench_binding_timed_wrapper_counts_calls_and_host_time():
    """--model's attention wrapper passes results through and sums each call's host seconds."""
    import bench_binding
    acc = [0.0, 0]
    slow = bench_binding._timed(lambda x, *, pause: (time.sleep(pause), x + 1)[1], acc)
    assert slow(1, pause=0.01) == 2 and slow(5, pause=0.0) == 6
    assert acc[1] == 2 and 0.01 <= acc[0] < 1.0


def test_bench_binding_refuses_an_unknown_model():
    import bench_binding
    with pytest.raises(SystemExit) as info:
        bench_binding.main(["--model", "GPT-5"])
    assert info.value.code == 2


def test_random_model_and_set_attention(monkeypatch):
    """The model tools' builder: the named shape in bf16, default dtype restored; set_attention
    switches the attention function the layers run."""
    pytest.importorskip("transformers")
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny", (64, 2, 4, 2, 16, 128, 100))
    model, vocab = bench.random_model("tiny", 64, device="cpu")
    assert vocab == 100 and len(model.layers) == 2
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.get_default_dtype() == torch.float32
    bench.set_attention(model, "eager")
    assert {layer.self_attn.config._attn_implementation for layer in model.layers} == {"eager"}


def test_sdpa_baseline_of_the_model_rows_is_causal_without_a_mask(monkeypatch):
    """The model rows' SDPA ("sdpa_causal") gets no mask object from transformers (so SDPA keeps
    its flash / cuDNN kernels under CUDA-graph capture too) and is still causal: the same hidden
    states as transformers' eager attention."""
    pytest.importorskip("transformers")
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    bench.register_attention()
    assert "sdpa_causal" not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    torch.manual_seed(0)
    monkeypatch.setitem(bench.MODEL_SHAPES, "tiny", (64, 2, 4, 2, 16, 128, 100))
    model, vocab = bench.random_model("tiny", 64, device="cpu")
    model = model.float()
    ids = torch.randint(0, vocab, (1, 40))
    out = {}
    for impl in ("eager", "sdpa_causal"):
        bench.set_attention(model, impl)
        with torch.no_grad():
            out[impl] = model(input_ids=ids, use_cache=False).last_hidden_state
    torch.testing.assert_close(out["sdpa_causal"], out["eager"], atol=1e-5, rtol=1e-5)
    bench.set_attention(model, "sdpa_causal")
    with torch.no_grad():  # not causal would differ: the first row sees only itself
        short = model(input_ids=ids[:, :1], use_cache=False).last_hidden_state
    torch.testing.assert_close(short[0, 0], out["sdpa_causal"][0, 0], atol=1e-5, rtol=1e-5)
