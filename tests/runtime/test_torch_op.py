"""asa_export/runtime/torch_op.py parts that run without a GPU: when the eager wrapper may call
the op's implementation directly instead of going through the torch.library dispatcher."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from asa_export.runtime import torch_op  # noqa: E402


def test_plain_tensors_call_directly():
    q = torch.randn(1, 2, 8, 4)
    assert torch_op._direct_call_ok((q, q, q, None, None, None, None, None))


def test_fake_tensors_and_dispatch_modes_go_through_the_op():
    """The op's fake implementation serves fake tensors; a dispatch mode must see the op."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode
    q = torch.randn(1, 2, 8, 4)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(q)
        assert not torch_op._direct_call_ok((fake, fake, fake))
    assert not torch_op._direct_call_ok((fake, q, q))  # a fake tensor outside its mode
    with FlopCounterMode(display=False):
        assert not torch_op._direct_call_ok((q, q, q))


def test_inputs_needing_autograd_go_through_the_op():
    """The op has no backward: through the dispatcher such a call keeps the op's behaviour."""
    q = torch.randn(1, 2, 8, 4)
    w = torch.randn(2, 4, 3, requires_grad=True)
    assert not torch_op._direct_call_ok((q, q, q, None, None, None, w, None))
    with torch.no_grad():
        assert torch_op._direct_call_ok((q, q, q, None, None, None, w, None))


def test_torch_compile_traces_the_op():
    """Under torch.compile the wrapper goes through the op, without a graph break (fullgraph):
    the dispatch-mode query Dynamo cannot trace once broke the graph at every call."""
    seen = []

    def fn(x):
        seen.append(torch_op._direct_call_ok((x, None)))
        return x + 1

    torch._dynamo.reset()
    torch.compile(fn, backend="eager", fullgraph=True)(torch.randn(3))
    assert seen and not any(seen)


def test_wrapper_on_cpu_tensors_names_the_device_either_way():
    """Direct or not, CPU tensors get the op's own error (the core runs on CUDA)."""
    from asa_export.errors import AsaExportError
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(AsaExportError, match="CUDA tensors only"):
        torch_op.sparse_attention(q, q, q)
    with pytest.raises(AsaExportError, match="CUDA tensors only"):  # through the dispatcher
        torch_op.op_call(q, q, q)


def _case(seq_q, seq_kv, dtype=torch.bfloat16):
    q = torch.randn(1, 9, seq_q, 64, dtype=dtype)
    k, v = torch.randn(1, 3, seq_kv, 64, dtype=dtype), torch.randn(1, 3, seq_kv, 64, dtype=dtype)
    return q, k, v, torch.empty_like(q)


def test_cached_params_equal_make_params_with_each_calls_pointers(monkeypatch):
    """`_plain_params` (the eager call's cached template) gives the bytes `make_params` gives,
    with the pointers of the call's own tensors, not the template's; its workspace size is the
    core's answer for the template, asked once per signature."""
    from asa_export.contract import AsaAttributes
    asked = []
    monkeypatch.setattr(torch_op, "workspace_size", lambda p: asked.append(p.seq_kv) or 4096)
    monkeypatch.setattr(torch_op, "_PLAIN_PARAMS", {})
    attrs = AsaAttributes(causal=True, block_size=64, threshold=0.4, local_blocks=3)
    for seq_q, seq_kv, dtype in [(97, 97, torch.bfloat16), (97, 97, torch.bfloat16),
                                 (1, 4099, torch.float16), (97, 97, torch.bfloat16)]:
        q, k, v, out = _case(seq_q, seq_kv, dtype)
        if seq_q == 1:  # a view into a longer cache: strides that its shape does not give
            k = torch.randn(1, 3, seq_kv + 5, 64, dtype=dtype)[:, :, :seq_kv]
        telemetry = [torch.empty(s, dtype=torch.int32)
                     for s in torch_op.telemetry_shapes(q, k, attrs)]
        expected, _ = torch_op.make_params(q, k, v, out, telemetry, attrs)
        params, size = torch_op._plain_params(q, k, v, out, telemetry, attrs)
        assert bytes(params) == bytes(expected)
        assert params.q == q.data_ptr() and params.visible_counts == telemetry[2].data_ptr()
        assert size == 4096
    assert asked == [97, 4099]  # one query per signature


def test_cached_params_are_bounded(monkeypatch):
    from asa_export.contract import AsaAttributes
    monkeypatch.setattr(torch_op, "workspace_size", lambda p: 1)
    monkeypatch.setattr(torch_op, "_PLAIN_PARAMS", {})
    attrs = AsaAttributes(causal=True, block_size=64)
    for seq_kv in range(1, torch_op._PLAIN_PARAMS_MAX + 10):  # a decode loop's growing keys
        q, k, v, out = _case(1, seq_kv)
        telemetry = [torch.empty(s, dtype=torch.int32)
                     for s in torch_op.telemetry_shapes(q, k, attrs)]
        torch_op._plain_params(q, k, v, out, telemetry, attrs)
    assert len(torch_op._PLAIN_PARAMS) == torch_op._PLAIN_PARAMS_MAX
    assert max(key[4][2] for key in torch_op._PLAIN_PARAMS) == torch_op._PLAIN_PARAMS_MAX + 9
