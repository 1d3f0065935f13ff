"""Turning `Row`s into the three outputs of a run: the table printed, `results.json` (raw
seconds of every round, plus the summary), and `ratios.png` (a bar chart of the ratios).

Summaries: per engine the median and min–max over rounds; the ratio to the row's baseline is
the median of the per-round ratios (pair by pair, the same round), which cancels the slow drifts
of a noisy machine better than a ratio of medians.  Pure functions; matplotlib is imported
only to draw, with the Agg backend (no screen).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from benchmarks.harness import Row


def pair_ratio(xs: list[float], base: list[float]) -> float | None:
    pairs = [a / b for a, b in zip(xs, base, strict=False) if b > 0]
    return statistics.median(pairs) if pairs else None


def summary(row: Row) -> dict[str, Any]:
    base = row.samples.get(row.baseline, [])
    out: dict[str, Any] = {}
    for engine, xs in row.samples.items():
        out[engine] = {
            "median": statistics.median(xs),
            "min": min(xs),
            "max": max(xs),
            "ratio": pair_ratio(xs, base) if engine != row.baseline else 1.0,
        }
    return out


def verdict(row: Row, engine: str, s: dict[str, Any]) -> str:
    if row.target is None or engine not in s:
        return ""
    value = s[engine]["median"] if row.target_kind == "seconds" else s[engine]["ratio"]
    if value is None:
        return ""
    return "ok" if value <= row.target else "MISS"


def _fmt_time(x: float) -> str:
    if x >= 10:
        return f"{x:.2f} s"
    if x >= 0.1:
        return f"{x * 1e3:.0f} ms"
    if x >= 0.001:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def _columns(row: Row, engines: list[str], s: dict[str, Any]) -> list[str]:
    """The engines of the run for rows against the kernel (plus any extra, like the null fs);
    otherwise the row's baseline tool first, then ours."""
    if row.baseline == "kernel":
        return [*engines, *[e for e in s if e not in engines]]
    return [row.baseline, *[e for e in s if e != row.baseline]]


def _cell(row: Row, engine: str, s: dict[str, Any], ratio_fmt: str, missing: str = "-") -> str:
    if engine in row.errors:
        return "failed"
    if engine not in s:
        return missing
    v = s[engine]
    cell = f"{_fmt_time(v['median'])} ({_fmt_time(v['min'])}–{_fmt_time(v['max'])})"
    if engine != row.baseline and v["ratio"] is not None:
        cell += " " + ratio_fmt.format(v["ratio"])
    return cell


def _target(row: Row, focus: str, s: dict[str, Any], sep: str = "") -> tuple[str, str]:
    """(the target as text, ok/MISS for `focus`), or two empty strings without a target."""
    if row.target is None:
        return "", ""
    if row.target_kind == "seconds":
        return f"≤{sep}{row.target:g} s", verdict(row, focus, s)
    return f"≤{sep}×{row.target:g}", verdict(row, focus, s)


def table(rows: list[Row], engines: list[str], focus: str = "layerfs") -> str:
    """One line per (workload, mode): median (min–max) per engine, ×ratio to the baseline, and
    the target for `focus` with ok/MISS."""
    lines: list[str] = []
    current: list[str] = []
    for row in rows:
        s = summary(row)
        cols = _columns(row, engines, s)
        if cols != current:  # a section with other columns (store tools, the null fs)
            what = (
                "workload"
                if not current
                else "(store: ours vs the usual tools)"
                if row.baseline != "kernel"
                else ""
            )
            current = cols
            lines.extend([""] if lines else [])
            lines.append(
                f"{'':5} {'':5} {what:52}" + "".join(f" {e:>30}" for e in cols) + f"  {'target':>8}"
            )
        line = f"{row.id:5} {row.mode:5} {row.title[:52]:52}"
        line += "".join(f" {_cell(row, e, s, '×{:.2f}'):>30}" for e in cols)
        target, ok = _target(row, focus, s)
        if target:
            line += f"  {target:>8} {ok}"
        lines.append(line)
    return "\n".join(lines)


def markdown(rows: list[Row], engines: list[str], focus: str = "layerfs") -> str:
    """The table as Markdown (for the README): median (min–max) and ×ratio per engine."""
    out: list[str] = []
    current: list[str] = []
    for row in rows:
        s = summary(row)
        cols = _columns(row, engines, s)
        if cols != current:
            current = cols
            if out:
                out.append("")
            out.append("| workload | " + " | ".join(cols) + " | target |")
            out.append("|---|" + "---|" * len(cols) + "---|")
        cells = [_cell(row, e, s, "**×{:.2f}**", missing="–") for e in cols]
        target, ok = _target(row, focus, s, sep=" ")
        mode = "" if row.mode == "once" else f" {row.mode}"
        last = f"{target} {ok}" if target else ""
        out.append(f"| {row.id}{mode}: {row.title} | " + " | ".join(cells) + f" | {last} |")
    return "\n".join(out)


def to_json(rows: list[Row], meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "meta": meta,
        "rows": [
            {
                "id": r.id,
                "mode": r.mode,
                "title": r.title,
                "baseline": r.baseline,
                "target": r.target,
                "target_kind": r.target_kind,
                "samples": r.samples,
                "errors": r.errors,
                "summary": summary(r),
            }
            for r in rows
        ],
    }


def from_json(data: dict[str, Any]) -> list[Row]:
    return [
        Row(
            r["id"],
            r["mode"],
            r["title"],
            r["baseline"],
            r["target"],
            r["target_kind"],
            r["samples"],
            r["errors"],
        )
        for r in data["rows"]
    ]


def chart(rows: list[Row], path: Path, title: str) -> None:
    """Horizontal bars: each engine's ratio to the row's baseline (log scale), the target as a
    tick, the baseline as the line at 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.target_kind == "ratio"]
    labels: list[str] = []
    series: dict[str, dict[int, float]] = {}  # engine -> row -> ratio
    for r in rows:
        s = summary(r)
        labels.append(f"{r.id} {r.mode}" if r.mode != "once" else r.id)
        for e, v in s.items():
            if e == r.baseline:
                continue
            key = e if r.baseline == "kernel" else f"{e} (vs {r.baseline})"
            key = "layer (vs skopeo/umoci)" if r.baseline != "kernel" else key
            series.setdefault(key, {})[len(labels) - 1] = v["ratio"]
    fig, ax = plt.subplots(figsize=(9, 0.42 * len(labels) + 1.6))
    height = 0.8 / max(1, len(series))
    colors = {"layerfs": "#1f77b4", "fuse-overlayfs": "#ff7f0e", "pyfuse3-null": "#7f7f7f"}
    for k, (name, ratios) in enumerate(series.items()):
        ys = [i + k * height for i in ratios]
        xs = [ratios[i] or 0 for i in ratios]
        ax.barh(ys, xs, height=height, label=name, color=colors.get(name, "#2ca02c"))
        for y, x in zip(ys, xs, strict=True):
            ax.text(x * 1.03, y, f"×{x:.2f}", va="center", fontsize=7)
    for i, r in enumerate(rows):
        if r.target is not None:
            ax.plot([r.target, r.target], [i - 0.1, i + 0.9], color="red", lw=1.5)
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(labels))], labels)
    ax.invert_yaxis()
    ax.set_xlabel(
        "time ratio to kernel overlayfs (store rows: to skopeo+umoci / umoci); red = target"
    )
    ax.set_title(title, fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(rows: list[Row], meta: dict[str, Any], out: Path, engines: list[str]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    text = table(rows, engines)
    (out / "results.json").write_text(json.dumps(to_json(rows, meta), indent=1) + "\n")
    (out / "table.txt").write_text(text + "\n")
    (out / "table.md").write_text(markdown(rows, engines) + "\n")
    chart(rows, out / "ratios.png", f"{meta.get('date', '')} {meta.get('machine', '')}")
    return text
