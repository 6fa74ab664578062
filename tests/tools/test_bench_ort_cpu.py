"""tools/bench_ort_cpu.py helpers: paired ratios, the settle-then-time loop, BENCHMARKS section
replacement (no model, no native library)."""

from __future__ import annotations

import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tools"))

import bench_ort_cpu as bench  # noqa: E402


def test_paired_ratio_is_the_median_of_round_ratios():
    # Round 2 is a load burst on both sides: best/best would say 1.0 / 0.4 = 2.5.
    base = [1.0, 3.0, 1.1]
    sparse = [0.5, 1.5, 0.4]
    assert bench.paired_ratio(base, sparse) == pytest.approx(2.0)


class CountingSession:
    """Stands in for an InferenceSession: counts calls, returns the call number."""

    def __init__(self):
        self.calls = 0

    def run(self, _outputs, _feeds):
        self.calls += 1
        return [self.calls]


def test_time_interleaved_settles_with_one_untimed_run_before_each_timed_run():
    a, b = CountingSession(), CountingSession()
    rows = bench._time_interleaved([(a, {}), (b, {})], repeats=3, settle=0.001)
    # one warm-up, then per repeat one untimed + one timed run
    assert a.calls == b.calls == 1 + 3 * 2
    assert [len(r["runs"]) for r in rows] == [3, 3]
    assert rows[0]["out"] == [a.calls] and rows[0]["s"] <= rows[0]["median"]
    c = CountingSession()
    bench._time_interleaved([(c, {})], repeats=2, settle=0)
    assert c.calls == 1 + 2


def test_write_section_replaces_only_the_cpu_head(tmp_path):
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(f"# Benchmarks\n\n## {bench.SECTION}\n\nold table\n\n### End to end\n\nkeep me\n"
                    "\n## Kernels (CUDA, GPU)\n\nkernels\n")
    bench.write_section(path, f"## {bench.SECTION}\n\nnew table\n")
    text = path.read_text()
    assert "new table" in text and "old table" not in text
    assert "### End to end\n\nkeep me" in text and "## Kernels (CUDA, GPU)\n\nkernels" in text
    fresh = tmp_path / "NEW.md"
    bench.write_section(fresh, f"## {bench.SECTION}\n\nfirst\n")
    assert fresh.read_text().startswith("# Benchmarks\n") and "first" in fresh.read_text()
