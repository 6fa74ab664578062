"""tools/select_phases.cu (per-phase clocks of the decode selection, run on the GPU machine)
compiles against router.cu as it is: the phase marks stay where the tool expects them."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")


def test_select_phases_tool_compiles(tmp_path):
    router = (ROOT / "plugins/core/cuda/router.cu").read_text()
    for phase in range(9):
        assert f"ASA_SELECT_PHASE({phase});" in router
    cmd = ["nvcc", "-c", "-std=c++17", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'plugins/core/include'}",
           f"-I{ROOT / 'plugins/core/cuda'}", str(ROOT / "tools/select_phases.cu"),
           "-o", str(tmp_path / "select_phases.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
