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
    seen = []

    def fn(x):
        seen.append(torch_op._direct_call_ok((x,)))
        return x + 1

    torch.compile(fn, backend="eager")(torch.randn(3))
    assert seen and not any(seen)


def test_wrapper_on_cpu_tensors_names_the_device_either_way():
    """Direct or not, CPU tensors get the op's own error (the core runs on CUDA)."""
    from asa_export.errors import AsaExportError
    q = torch.randn(1, 2, 8, 4)
    with pytest.raises(AsaExportError, match="CUDA tensors only"):
        torch_op.sparse_attention(q, q, q)
    with pytest.raises(AsaExportError, match="CUDA tensors only"):  # through the dispatcher
        torch_op.op_call(q, q, q)
