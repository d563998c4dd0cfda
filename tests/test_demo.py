"""``python -m aiograceful demo``: the naive close loses, aiograceful delivers, all measured.

The demo is the "reproduce the failure first" proof: the same hazards, run
with the close a typical asyncio server does, lose replies; with aiograceful
they do not. These tests run it as a user does, in a subprocess.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass

from aiograceful._tools.demo import CASES, GRACEFUL, NAIVE, Row, Tally, summary

_ROW = re.compile(
    r"^(H\d)\s+(.+?)\s+(asyncio|uvloop)\s+(naive|aiograceful)\s+(\d+)/(\d+)"
    r"\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+(.*)$"
)


@dataclass(frozen=True)
class _Parsed:
    hazard: str
    title: str
    loop: str
    close: str
    delivered: int
    total: int
    lost: int
    fin: int
    rst: int
    open: int


def _run(*args: str) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "aiograceful", "demo", *args],
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    assert proc.stderr == "", proc.stderr
    return proc.returncode, proc.stdout, time.monotonic() - started


def _rows(out: str) -> list[_Parsed]:
    rows = []
    for line in out.splitlines():
        match = _ROW.match(line)
        if match:
            h, title, loop, close, d, t, lost, fin, rst, op, _ = match.groups()
            rows.append(
                _Parsed(
                    h, title, loop, close, int(d), int(t), int(lost), int(fin), int(rst), int(op)
                )
            )
    return rows


def test_demo_naive_loses_aiograceful_delivers() -> None:
    """With 3 rounds on both loops, every naive hazard loses replies; aiograceful loses none."""
    status, out, _ = _run("--rounds", "3", "--loop", "both")
    print(out)
    rows = _rows(out)
    assert len(rows) == len(CASES) * 2 * 2, out  # every case, both loops, both closes
    for row in rows:
        assert row.delivered + row.lost == row.total
        assert row.fin + row.rst + row.open > 0, row  # every case had connections
    graceful = [row for row in rows if row.close == GRACEFUL]
    assert all(row.lost == 0 and row.open == 0 for row in graceful), out
    # What the naive close loses, per hazard, summed over both loops.
    for case in CASES:
        naive = [r for r in rows if r.close == NAIVE and r.title == case.title]
        assert sum(r.lost for r in naive) > 0, f"{case.hazard} {case.title}: no loss\n{out}"
    # The resets themselves: H1 and H4's naive close end in RST, aiograceful's in FIN.
    for title in ("early 413 during an upload", "accept queue at shutdown"):
        assert all(r.rst > 0 for r in rows if r.title == title and r.close == NAIVE)
        assert all(r.rst == 0 for r in rows if r.title == title and r.close == GRACEFUL)
    # abort(): the naive transport.abort() is seen as a FIN; aiograceful's as a RST.
    aborts = [r for r in rows if r.title == "abort()"]
    assert all(r.fin == r.total for r in aborts if r.close == NAIVE)
    assert all(r.rst == r.total for r in aborts if r.close == GRACEFUL)
    assert status == 0
    assert "aiograceful delivered everything" in out


def test_demo_default_run_finishes_within_a_minute() -> None:
    """The default demo (both loops, default rounds) exits 0 in under a minute."""
    status, out, elapsed = _run()
    assert status == 0, out
    assert elapsed < 60.0 + 2.0, f"took {elapsed:.1f} s"
    assert "measured now" in out


def _row(close: str, lost: int, delivered: int = 3) -> Row:
    return Row(CASES[0], "asyncio", close, Tally(delivered=delivered, lost=lost), 0.1)  # type: ignore[arg-type]


def test_demo_summary_fails_when_aiograceful_loses() -> None:
    """The exit status depends only on aiograceful's rows: one loss there fails the demo."""
    ok, line = summary([_row(NAIVE, 3, 0), _row(GRACEFUL, 1, 2)])
    assert not ok
    assert "did NOT deliver" in line
    ok, line = summary([_row(NAIVE, 0, 3), _row(GRACEFUL, 0, 3)])
    assert ok  # a naive case that happened not to lose does not fail the demo
    assert "lost 0/3" in line
