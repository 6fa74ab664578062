"""plugins/torch/asa_torch_op.cpp (the compiled host path, runtime/torch_native.py) without a
GPU: built against this torch, called on CPU tensors with recording callbacks in place of the
core's entry points; the AsaParams it fills must be `torch_op.make_params`'s bytes."""

from __future__ import annotations

import ctypes
import os
import shutil

import pytest

torch = pytest.importorskip("torch")

from asa_export.contract import AsaAttributes  # noqa: E402
from asa_export.runtime import torch_native, torch_op  # noqa: E402
from asa_export.runtime.abi import AsaParams  # noqa: E402

SIZE_FN = ctypes.CFUNCTYPE(ctypes.c_size_t, ctypes.POINTER(AsaParams))
ENTRY_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(AsaParams), ctypes.c_void_p,
                            ctypes.c_size_t, ctypes.c_void_p)
ERROR_FN = ctypes.CFUNCTYPE(ctypes.c_void_p)  # const char*, kept alive by FakeCore


@pytest.fixture(scope="module")
def native():
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler to build the extension")
    mod = torch_native.module()
    assert mod is not None, torch_native.build_error
    return mod


class FakeCore:
    """Callbacks standing in for asa_cuda_workspace_size / asa_cuda_forward / asa_last_error."""

    def __init__(self, size=4096, status=0, message=b""):
        self.calls = []
        self.sizes = SIZE_FN(lambda p: size)
        self.entry = ENTRY_FN(self._entry)
        self.message = ctypes.create_string_buffer(message)
        self.error = ERROR_FN(lambda: ctypes.addressof(self.message))
        self.status = status

    def _entry(self, params, workspace, size, stream):
        self.calls.append((bytes(AsaParams.from_buffer_copy(params.contents)), size, stream))
        return self.status

    def addresses(self):
        return tuple(torch_native.address(f) for f in (self.sizes, self.entry, self.error))


CASES = [  # (Hq, Hkv, Sq, Skv, D, Dv, dtype, attributes)
    (9, 3, 97, 97, 64, 64, torch.bfloat16, AsaAttributes(causal=True, block_size=64,
                                                         threshold=0.4)),
    (8, 2, 1, 4099, 128, 128, torch.float16, AsaAttributes(
        causal=True, block_size=128, threshold=0.9, sink_blocks=2, local_blocks=3, window=1000,
        softcap=30.0, select_per=1, scale=0.1)),
    (4, 4, 33, 300, 64, 32, torch.float32, AsaAttributes(causal=False, block_size=64,
                                                         threshold=1.0)),
]


@pytest.mark.parametrize("case", CASES, ids=["bf16-causal", "fp16-decode-view-group", "fp32-full"])
def test_compiled_params_equal_make_params(native, case):
    heads_q, heads_kv, seq_q, seq_kv, dim, dim_v, dtype, attrs = case
    q = torch.randn(2, heads_q, seq_q, dim, dtype=dtype)
    k = torch.randn(2, heads_kv, seq_kv + 7, dim, dtype=dtype)[:, :, :seq_kv]  # a cache view
    v = torch.randn(2, heads_kv, seq_kv, dim_v, dtype=dtype)
    core = FakeCore()
    result = torch_native.plain_forward(native, q, k, v, attrs, torch_op._DTYPES[dtype],
                                        core.addresses(), 0xABC)
    out, *telemetry = result
    assert tuple(out.shape) == (2, heads_q, seq_q, dim_v) and out.dtype == dtype
    assert [tuple(t.shape) for t in telemetry] == list(torch_op.telemetry_shapes(q, k, attrs))
    assert all(t.dtype == torch.int32 for t in telemetry)
    expected, _ = torch_op.make_params(q, k, v, out, telemetry, attrs)
    [(params, size, stream)] = core.calls
    assert params == bytes(expected)
    assert (size, stream) == (4096, 0xABC)


def test_core_errors_carry_the_core_message(native):
    q = torch.randn(1, 2, 8, 64)
    attrs = AsaAttributes(block_size=64)
    rejected = FakeCore(size=0, message=b"heads_q must be a multiple of heads_kv")
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        torch_native.plain_forward(native, q, q, q, attrs, 0, rejected.addresses(), 0)
    assert rejected.calls == []  # the entry point is not called with rejected params
    failed = FakeCore(status=700, message=b"an illegal memory access was encountered")
    with pytest.raises(ValueError, match="CUDA error 700: an illegal memory access"):
        torch_native.plain_forward(native, q, q, q, attrs, 0, failed.addresses(), 0)


@pytest.fixture
def fresh_policy(monkeypatch, tmp_path):
    """torch_native with its build root in tmp_path and no cached answer."""
    monkeypatch.setattr(torch_native, "_BUILD_ROOT", tmp_path)
    monkeypatch.setattr(torch_native, "_BUILT_AHEAD", [])
    return tmp_path


def _fake_build(mtime_offset: float) -> None:
    target = torch_native.build_dir()
    target.mkdir(parents=True)
    lib = target / "asa_torch_native.so"
    lib.write_bytes(b"")
    stamp = torch_native._SOURCE.stat().st_mtime + mtime_offset
    os.utime(lib, (stamp, stamp))


def test_default_takes_only_a_path_built_ahead(fresh_policy, monkeypatch):
    monkeypatch.delenv("ASA_TORCH_NATIVE", raising=False)
    assert not torch_native.built_ahead() and not torch_native.enabled()
    monkeypatch.setattr(torch_native, "_BUILT_AHEAD", [])
    _fake_build(+1)
    assert torch_native.built_ahead() and torch_native.enabled()
    assert torch_native.build_dir().parent == fresh_policy
    assert f"torch{torch.__version__}".replace("+", "_") in torch_native.build_dir().name


def test_default_skips_a_build_older_than_its_source(fresh_policy, monkeypatch):
    monkeypatch.delenv("ASA_TORCH_NATIVE", raising=False)
    _fake_build(-10)
    assert not torch_native.built_ahead()
    with pytest.warns(UserWarning, match="older than asa_torch_op.cpp.*--torch"):
        assert not torch_native.enabled()


def test_setting_overrides_the_default(fresh_policy, monkeypatch):
    monkeypatch.setenv("ASA_TORCH_NATIVE", "1")
    assert torch_native.enabled()  # builds on first use
    _fake_build(+1)
    monkeypatch.setenv("ASA_TORCH_NATIVE", "0")
    assert not torch_native.enabled()
    monkeypatch.setenv("ASA_TORCH_NATIVE", "yes")
    with pytest.raises(ValueError, match="must be 0 .* got 'yes'"):
        torch_native.enabled()


def _build_plugins():
    import importlib.util
    path = torch_native._SOURCE.parents[2] / "tools" / "build_plugins.py"
    spec = importlib.util.spec_from_file_location("build_plugins", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_build_plugins_builds_it_ahead(native, monkeypatch):
    """`tools/build_plugins.py --torch` leaves the extension where the default policy finds it."""
    assert _build_plugins().main(["--no-ort", "--torch"]) == 0
    monkeypatch.delenv("ASA_TORCH_NATIVE", raising=False)
    monkeypatch.setattr(torch_native, "_BUILT_AHEAD", [])
    assert torch_native.built_ahead() and torch_native.enabled()


def test_build_plugins_refuses_another_build_dir_for_torch(tmp_path, capsys):
    assert _build_plugins().main(["--no-ort", "--torch", "--build-dir", str(tmp_path)]) == 2
    assert "plugins/build/torch" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
