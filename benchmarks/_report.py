"""Results: one table per benchmark, rendered to markdown, stored as JSON."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ._harness import Config, median

__all__ = [
    "Column",
    "Section",
    "median_of",
    "paired",
    "ratio_rows",
    "ratio_summary",
    "render_markdown",
    "render_section",
    "write_results",
]


@dataclasses.dataclass(frozen=True)
class Column:
    """One column of a table: the row key it shows, its header, its number format."""

    key: str
    header: str
    fmt: str = "{:.2f}"

    def cell(self, row: Mapping[str, Any]) -> str:
        value = row.get(self.key)
        if value is None:
            return ""
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        if isinstance(value, int | float):
            return self.fmt.format(value)
        return str(value)


@dataclasses.dataclass
class Section:
    """The result of one benchmark: a table, notes, and the raw runs behind it."""

    name: str
    title: str
    what: str
    columns: list[Column]
    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    runs: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    skipped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "what": self.what,
            "columns": [{"key": c.key, "header": c.header} for c in self.columns],
            "rows": self.rows,
            "notes": self.notes,
            "runs": self.runs,
            "skipped": self.skipped,
        }


def paired(
    cfg: Config,
    variants: Sequence[str],
    run_one: Callable[[str, str, int], dict[str, Any]],
) -> list[dict[str, Any]]:
    """Run every (loop, variant) once per repeat, interleaved; return the runs.

    The variants alternate order from one repeat to the next (ABBA), so a
    slow drift of the machine's load falls on both sides of a ratio alike.
    Each run dict gets "loop", "variant" and "repeat".
    """
    runs: list[dict[str, Any]] = []
    for repeat in range(cfg.repeats):
        order = list(variants) if repeat % 2 == 0 else list(reversed(variants))
        for loop_name in cfg.loops:
            for variant in order:
                figures = run_one(loop_name, variant, repeat)
                runs.append({"loop": loop_name, "variant": variant, "repeat": repeat, **figures})
    return runs


def _select(runs: Iterable[dict[str, Any]], loop_name: str, variant: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["loop"] == loop_name and r["variant"] == variant]


def ratio_summary(
    runs: Sequence[dict[str, Any]],
    loop_name: str,
    variant: str,
    baseline: str,
    key: str,
) -> tuple[float, list[float]]:
    """The median over repeats of ``variant[key] / baseline[key]`` paired by repeat."""
    mine = {r["repeat"]: r.get(key) for r in _select(runs, loop_name, variant)}
    base = {r["repeat"]: r.get(key) for r in _select(runs, loop_name, baseline)}
    ratios: list[float] = []
    for k in sorted(mine):
        value, reference = mine[k], base.get(k)
        if value is not None and reference and not math.isnan(float(reference)):
            ratios.append(float(value) / float(reference))
    return median(ratios), ratios


def median_of(runs: Sequence[dict[str, Any]], loop_name: str, variant: str, key: str) -> float:
    """The median of ``key`` over the runs of (loop, variant)."""
    values = [float(r[key]) for r in _select(runs, loop_name, variant) if r.get(key) is not None]
    return median(values)


def ratio_rows(
    runs: Sequence[dict[str, Any]],
    loops: Sequence[str],
    variants: Sequence[str],
    baseline: str,
    key: str,
    medians: Sequence[str],
    target: str | None = None,
) -> list[dict[str, Any]]:
    """One row per (loop, variant): medians of ``medians`` keys, and ``key``'s ratio to baseline.

    ``target`` is shown beside the uvloop ratios (the loop the targets are set for).
    """
    rows: list[dict[str, Any]] = []
    for loop_name in loops:
        for variant in variants:
            row: dict[str, Any] = {"loop": loop_name, "variant": variant}
            for name in medians:
                row[name] = median_of(runs, loop_name, variant, name)
            if variant != baseline:
                ratio, ratios = ratio_summary(runs, loop_name, variant, baseline, key)
                row["ratio"] = ratio
                row["ratios"] = " ".join(f"{x:.3f}" for x in ratios)
                if target is not None and loop_name == "uvloop":
                    row["target"] = target
            rows.append(row)
    return rows


def _table(section: Section) -> list[str]:
    header = "| " + " | ".join(c.header for c in section.columns) + " |"
    rule = "|" + "|".join("---" for _ in section.columns) + "|"
    lines = [header, rule]
    for row in section.rows:
        lines.append("| " + " | ".join(c.cell(row) for c in section.columns) + " |")
    return lines


def render_markdown(meta: Mapping[str, Any], sections: Sequence[Section]) -> str:
    """The whole results page."""
    machine = meta["machine"]
    lines = [
        "# aiograceful benchmarks",
        "",
        f"Run `{meta['command']}` at {meta['started']} ({meta['duration_s']:.0f} s).",
        "",
        "| machine | |",
        "|---|---|",
        f"| CPU | {machine['cpu_model']} |",
        f"| cores | {machine['cpus']} ({machine['cpus_usable']} usable) |",
        f"| Python | {machine['python']} ({machine['python_impl']}) |",
        f"| uvloop | {machine['uvloop']} |",
        f"| aiograceful | {machine['aiograceful']} |",
        f"| kernel | {machine['kernel']} |",
        f"| RLIMIT_NOFILE hard | {machine['nofile_hard_limit']} |",
        f"| load average before / after | {meta['load_before']} / {meta['load_after']} |",
        f"| repeats per pair | {meta['config']['repeats']} |",
        "",
    ]
    if meta.get("shared_note"):
        lines += [f"**{meta['shared_note']}**", ""]
    lines += [
        "Ratios are medians over the repeats of each run's figure divided by its "
        "baseline's figure from the same repeat. Server CPU time is read inside the "
        "server process; the load generator is a separate process on "
        f"{meta['client_loop']}. None of these numbers is a pass/fail check.",
        "",
    ]
    for section in sections:
        lines.append(render_section(section))
    return "\n".join(lines)


def render_section(section: Section) -> str:
    """One benchmark's heading, description, table and notes, in markdown."""
    lines = [f"## {section.title}", "", section.what, ""]
    if section.skipped:
        lines += [f"Not run: {section.skipped}", ""]
        return "\n".join(lines)
    lines += _table(section)
    lines.append("")
    for note in section.notes:
        lines.append(f"- {note}")
    if section.notes:
        lines.append("")
    return "\n".join(lines)


def write_results(
    directory: Path, stem: str, meta: Mapping[str, Any], sections: Sequence[Section]
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``directory``; return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    md_path = directory / f"{stem}.md"
    json_path = directory / f"{stem}.json"
    md_path.write_text(render_markdown(meta, sections), encoding="utf-8")
    payload = _clean({**meta, "benchmarks": [s.to_json() for s in sections]})
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    return md_path, json_path


def _clean(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON has neither)."""
    if isinstance(value, float):
        return None if math.isnan(value) or math.isinf(value) else value
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value
