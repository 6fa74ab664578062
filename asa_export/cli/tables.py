"""Plain-text tables for the CLI (the library returns data; only the CLI formats it)."""

from __future__ import annotations

from asa_export.report import Report


def table(headers: list[str], rows: list[list], indent: str = "") -> str:
    """Left-aligned columns separated by two spaces, with a rule under the header."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(indent + line for line in lines)


def report_table(report: Report) -> str:
    """Sites, counts per rule, and rejected regions with their reasons."""
    parts = [f"model: {report.model}"]
    if report.sites:
        parts.append(f"\n{len(report.sites)} attention site(s):")
        parts.append(table(
            ["layer", "rule", "q heads", "kv heads", "head dim", "causal", "window", "softcap",
             "mask", "past KV", "anchor"],
            [[s.layer, s.rule, s.q_heads, s.kv_heads, _head_dim(s), "yes" if s.causal else "no",
              s.window if s.window > 0 else "-", s.softcap if s.softcap else "-", s.mask,
              "yes" if s.past_kv else "no", s.anchor] for s in report.sites],
        ))
        counts = ", ".join(f"{rule}: {n}" for rule, n in sorted(report.counts_per_rule().items()))
        parts.append(f"per rule: {counts}")
        notes = [f"  layer {s.layer}: {note}" for s in report.sites for note in s.notes]
        if notes:
            parts.append("notes:\n" + "\n".join(notes))
    else:
        parts.append("\nno attention site found")
    if report.rejected:
        parts.append(f"\n{len(report.rejected)} region(s) left unchanged:")
        parts.append(table(["anchor", "rule", "reason"],
                           [[r.anchor, r.rule, r.reason] for r in report.rejected]))
    return "\n".join(parts)


def check_tables(result) -> str:
    """Per-output errors, density per layer, and the verdict of an asa_export.check run."""
    sizes = "; ".join(
        f"batch {c['batch']} seq {c['seq']}" + (f" past {c['past']}" if c.get("past") else "")
        + f" pad {c['pad'] or 'none'}" for c in result.iterations
    )
    parts = [f"inputs: {sizes}",
             f"tolerance: atol {result.atol:g}, rtol {result.rtol:g} (rows with a visible key)\n"]
    parts.append(table(
        ["output", "max abs", "mean abs", "max rel", "mean rel", "compared", "skipped", "result"],
        [[o.name, _num(o.max_abs), _num(o.mean_abs), _num(o.max_rel), _num(o.mean_rel),
          o.compared, o.skipped, _verdict(o, result)] for o in result.outputs],
    ))
    if result.density:
        parts.append("\nattention density per layer (kept / visible key blocks):")
        parts.append(table(["layer", "node", "kept", "visible", "density"],
                           [[d.layer, d.node, d.kept, d.visible, f"{d.density:.3f}"]
                            for d in result.density]))
        parts.append(f"overall density: {result.overall_density:.3f}")
    elif result.density_error:
        parts.append(f"\ndensity not measured: {result.density_error}")
    parts.append("\nPASSED" if result.passed else "\nFAILED: outputs differ beyond tolerance")
    return "\n".join(parts)


def _verdict(output, result) -> str:
    """ok (element-wise), within noise (passed by the check's noise-floor rule), or MISMATCH."""
    if output.passed:
        return "ok"
    return "within noise" if result.passed else "MISMATCH"


def _head_dim(site) -> str:
    if site.head_dim_v is not None and site.head_dim_v != site.head_dim:
        return f"{_cell(site.head_dim)}/{site.head_dim_v}"
    return _cell(site.head_dim)


def _num(value: float) -> str:
    return f"{value:.3g}"


def _cell(value) -> str:
    return "?" if value is None else str(value)
