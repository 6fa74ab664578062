"""The first kernel of an entry point waits for the caller's kernel before it (CUDA core).

Our decode kernels are chained (programmatic dependent launch, common.cuh) and some read q, k
or v before their wait. A caller's kernel that signals its dependents early while it still
writes q (a GEMM with programmatic dependent launch signals once its MMAs are issued, before its
epilogue stores) must not let the first kernel of our call start: kernels.h's begin_chain. The
test puts such a kernel before the call: it signals at once, spins, then writes the new q over
the old one; the call's result must be that of the new q.

GPU only (`gpu` marker; compute capability 9.0+, where launches can be chained; nvcc builds the
signalling kernel); the library comes from $ASA_CUDA_LIB.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest

torch = pytest.importorskip("torch")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to build the signaller"),
]

from asa_export.contract import AsaAttributes  # noqa: E402

SIGNALLER = r"""
#include <cuda_runtime.h>
// Signals its dependents at once, then after `cycles` clock cycles copies n bytes.
__global__ void signal_then_copy(unsigned char* dst, const unsigned char* src, long long n,
                                 long long cycles) {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
  for (long long i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}
extern "C" int signal_then_copy_launch(void* dst, const void* src, long long n,
                                       long long cycles, void* stream) {
  signal_then_copy<<<1, 256, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<unsigned char*>(dst), static_cast<const unsigned char*>(src), n, cycles);
  return static_cast<int>(cudaGetLastError());
}
"""


@pytest.fixture(scope="module")
def op():
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("chained launches need compute capability 9.0+")
    from asa_export.runtime import torch_op
    torch_op.find_cuda_library()
    return torch_op


@pytest.fixture(scope="module")
def signaller(tmp_path_factory):
    folder = tmp_path_factory.mktemp("signaller")
    (folder / "signaller.cu").write_text(SIGNALLER)
    cmd = ["nvcc", "-shared", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a",
           "-o", str(folder / "libsignaller.so"), str(folder / "signaller.cu")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lib = ctypes.CDLL(str(folder / "libsignaller.so"))
    lib.signal_then_copy_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_longlong,
                                            ctypes.c_longlong, ctypes.c_void_p]
    return lib


ATTRS = AsaAttributes(causal=True, block_size=64, threshold=0.5, sink_blocks=1, local_blocks=1,
                      select_per=1)


def decode_inputs(seed: int):
    """One decode row (B 1, Hq 8, Hkv 2, D 64) against 4096 keys with block structure; two
    queries that route differently."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    k = torch.randn(1, 2, 4096, 64, generator=g, device="cuda")
    k += 2 * torch.randn(1, 2, 64, 64, generator=g, device="cuda").repeat_interleave(64, dim=2)
    v = torch.randn(1, 2, 4096, 64, generator=g, device="cuda")
    q_old, q_new = (3 * torch.randn(1, 8, 1, 64, generator=g, device="cuda") for _ in range(2))
    return (t.to(torch.bfloat16) for t in (q_old, q_new, k, v))


class Call:
    """Params, outputs and workspace of one entry-point call, all allocated up front so that no
    kernel of ours or torch's runs between the signaller and the call."""

    def __init__(self, op, q, k, v, stats):
        self.op, self.q = op, q
        self.out = torch.empty_like(q)
        self.tele = [torch.full(s, -7, dtype=torch.int32, device="cuda")
                     for s in op.telemetry_shapes(q, k, ATTRS)]
        self.params, self._keep = op.make_params(q, k, v, self.out, self.tele, ATTRS,
                                                 key_block_stats=stats,
                                                 key_block_stats_blocks=stats.shape[2])
        self.lib = op._library()
        self.size = self.lib.asa_cuda_workspace_size(ctypes.byref(self.params))
        self.ws = torch.empty(max(self.size, 1), dtype=torch.uint8, device="cuda")

    def __call__(self, entry: str, stream) -> None:
        err = getattr(self.lib, entry)(ctypes.byref(self.params),
                                       ctypes.c_void_p(self.ws.data_ptr()),
                                       ctypes.c_size_t(self.size), ctypes.c_void_p(stream))
        assert err == 0, self.lib.asa_last_error().decode()


@pytest.mark.parametrize("entry", ["asa_cuda_route", "asa_cuda_attention"])
def test_call_after_an_early_signalling_kernel_sees_its_writes(op, signaller, entry,
                                                               monkeypatch):
    """asa_cuda_route with every key block's statistics cached starts with logits_decode, which
    pools q̄ before its wait; asa_cuda_attention starts with the attention kernel, which copies
    Q before its wait. Both must see the q the kernel before them writes."""
    monkeypatch.delenv("ASA_CUDA_PDL", raising=False)
    monkeypatch.delenv("ASA_CUDA_FUSED_ROUTE", raising=False)
    q_old, q_new, k, v = decode_inputs(seed=11)
    stats = op.key_block_stats(k, ATTRS)
    expected = Call(op, q_new.clone(), k, v, stats)
    stale = Call(op, q_old.clone(), k, v, stats)
    expected("asa_cuda_forward", torch.cuda.current_stream().cuda_stream)
    stale("asa_cuda_forward", torch.cuda.current_stream().cuda_stream)
    assert not torch.equal(expected.tele[0], stale.tele[0]), "both queries route alike: weak test"

    call = Call(op, q_old.clone(), k, v, stats)
    if entry == "asa_cuda_attention":  # the lists of the new q, as a router before it wrote them
        for mine, theirs in zip(call.tele, expected.tele):
            mine.copy_(theirs)
    call.out.fill_(float("nan"))
    torch.cuda.synchronize()
    stream = torch.cuda.current_stream().cuda_stream
    nbytes = q_new.numel() * q_new.element_size()
    for _ in range(3):  # the race is timing-dependent: a few tries with a long spin
        call.q.copy_(q_old)
        torch.cuda.synchronize()
        err = signaller.signal_then_copy_launch(call.q.data_ptr(), q_new.data_ptr(), nbytes,
                                                2_000_000, stream)  # ~1 ms at 2 GHz
        assert err == 0
        call(entry, stream)
        torch.cuda.synchronize()
        assert torch.equal(call.q, q_new)
        if entry == "asa_cuda_route":
            for mine, theirs, what in zip(call.tele, expected.tele, ("lists", "counts", "vis")):
                assert torch.equal(mine, theirs), f"{what} of the old q: the call started early"
        else:
            assert torch.equal(call.out, expected.out), "output of the old q: started early"
