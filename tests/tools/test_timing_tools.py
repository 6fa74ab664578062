"""The GPU machine's timing tools (tools/select_phases.cu, tools/route_phases.cu,
tools/attn_timeline.cu: per-phase clocks of the decode router and attention) compile against the
kernel sources as they are, with every mark the tool expects still in place."""
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc on PATH")

# tool, kernel source it includes, {mark macro: number of marks}
TOOLS = [
    ("select_phases.cu", "router.cu", {"ASA_SELECT_PHASE": 9}),
    ("route_phases.cu", "router.cu", {"ASA_ROUTE_PHASE": 14}),
    ("attn_timeline.cu", "attention_mma.cu", {"ASA_ATTN_MARK": 6, "ASA_MERGE_MARK": 3}),
]


@pytest.mark.parametrize("tool,source,marks", TOOLS, ids=[t[0] for t in TOOLS])
def test_timing_tool_compiles(tmp_path, tool, source, marks):
    text = (ROOT / "plugins/core/cuda" / source).read_text()
    for macro, count in marks.items():
        for i in range(count):
            assert f"{macro}({i});" in text, f"{macro}({i}) missing from {source}"
        assert f"{macro}({count});" not in text, f"{source} has more {macro} marks than {tool}"
    cmd = ["nvcc", "-c", "-std=c++17", "--expt-relaxed-constexpr",
           "-gencode=arch=compute_90a,code=sm_90a", f"-I{ROOT / 'plugins/core/include'}",
           f"-I{ROOT / 'plugins/core/cuda'}", str(ROOT / "tools" / tool),
           "-o", str(tmp_path / "tool.o")]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
