"""``python -m aiograceful demo``: the naive close loses, aiograceful delivers, all measured.

The demo is the "reproduce the failure first" proof: the same hazards, run
with the close real servers do (and against stock uvicorn, hypercorn and
aiohttp), lose replies, bytes, aborts or connections; with aiograceful they
do not. These tests run it as a user does, in a subprocess, and read its
output: they fail when aiograceful's side loses anything, and when a naive
side stops showing its hazard.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass

import pytest

from aiograceful._tools import demo as _demo
from aiograceful._tools.demo import CASES, GRACEFUL, NAIVE, Row, Tally, summary

_HEAD = re.compile(r"^(H\d)  (?:(uvicorn|hypercorn|aiohttp): )?(.+) \((\w+)\)$")
_ROW = re.compile(
    r"^    (asyncio|uvloop)\s+(naive|aiograceful)\s+(.+?)\s+(\d+)/(\d+)"
    r"\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)  (.*)$"
)


@dataclass(frozen=True)
class _Parsed:
    hazard: str
    server: str
    title: str
    unit: str
    loop: str
    close: str
    how: str
    delivered: int
    total: int
    lost: int
    fin: int
    rst: int
    open: int
    verdict: str


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
    head: tuple[str, str, str, str] | None = None
    for line in out.splitlines():
        if (match := _HEAD.match(line)) is not None:
            hazard, server, title, unit = match.groups()
            head = (hazard, server or "", title, unit)
        elif (match := _ROW.match(line)) is not None:
            assert head is not None, line
            loop, close, how, d, t, lost, fin, rst, op, verdict = match.groups()
            rows.append(
                _Parsed(
                    *head,
                    loop,
                    close,
                    how,
                    int(d),
                    int(t),
                    int(lost),
                    int(fin),
                    int(rst),
                    int(op),
                    verdict,
                )
            )
    return rows


def test_demo_naive_loses_aiograceful_delivers() -> None:
    """3 rounds, both loops, installed servers: every naive hazard shows; aiograceful loses none."""
    status, out, _ = _run("--rounds", "3", "--loop", "both")
    print(out)
    rows = _rows(out)
    servers = _demo.installed_servers()
    assert servers, "the dev extra installs uvicorn, hypercorn and aiohttp"
    drop_ins = _demo.server_cases(servers, _demo.ServerPool("uvloop"))
    # Every case on both loops with both closes; each drop-in case once with both.
    assert len(rows) == len(CASES) * 2 * 2 + len(drop_ins) * 2, out
    for row in rows:
        assert row.delivered + row.lost == row.total, row
        assert row.fin + row.rst + row.open > 0, row  # every case had connections
        # The naive side is named as what real servers do; aiograceful's as its API.
        assert row.how not in ("naive", "aiograceful", ""), row
    graceful = [row for row in rows if row.close == GRACEFUL]
    assert all(row.lost == 0 and row.open == 0 for row in graceful), out
    assert all(row.verdict.startswith(f"all {row.unit} delivered") for row in graceful), out
    for case in (*CASES, *drop_ins):
        mine = [r for r in rows if (r.hazard, r.title, r.server) == _case_key(case)]
        assert mine, f"{case.label}: no rows\n{out}"
        assert all(r.unit == case.unit for r in mine), mine
        naive = [r for r in mine if r.close == NAIVE]
        assert all(r.how == case.naive for r in naive), naive
        if case.hazard_shown:
            assert sum(r.lost for r in naive) > 0, f"{case.label}: no loss\n{out}"
    # The resets themselves: H1 and H4's naive close end in RST, aiograceful's in FIN.
    for title in ("early 413 during an upload", "accept queue at shutdown"):
        inproc = [r for r in rows if r.title == title and not r.server]
        assert all(r.rst > 0 for r in inproc if r.close == NAIVE)
        assert all(r.rst == 0 for r in inproc if r.close == GRACEFUL)
    # abort(): the naive transport.abort() is seen as a FIN; aiograceful's as a RST.
    aborts = [r for r in rows if r.title == "abort()"]
    assert all(r.fin == r.total for r in aborts if r.close == NAIVE)
    assert all(r.rst == r.total for r in aborts if r.close == GRACEFUL)
    # H6 counts bytes: 1 MiB per round, 2 rounds. A plain close delivers them
    # all (the reference); the close timed from the close does not.
    h6 = [r for r in rows if r.hazard == "H6"]
    assert all(r.unit == "bytes" and r.total == 2 << 20 for r in h6), h6
    assert all(r.lost == 0 for r in h6 if r.title == "slow reader, plain close"), h6
    # H7 counts connections; the naive restart's are refused, and the successor's
    # start delay is printed.
    h7 = [r for r in rows if r.hazard == "H7"]
    assert all("the successor's start delay: 1 s" in r.verdict for r in h7), h7
    assert all("refused" in r.verdict for r in h7 if r.close == NAIVE and r.lost), h7
    # No sum of unlike things: the final line names each unit's rows.
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("aiograceful delivered everything: replies in H1, "), last
    for part in ("aborts in H5 abort", "bytes in H6 plain, H6 timed", "connections in H7"):
        assert part in last, last
    assert status == 0


def _case_key(case: _demo.Case) -> tuple[str, str, str]:
    return case.hazard, case.title, case.server


def test_demo_default_run_is_short() -> None:
    """The default demo (both loops, default rounds, the installed servers) exits 0 in ~25 s."""
    status, out, elapsed = _run()
    assert status == 0, out
    assert elapsed < 45.0, f"took {elapsed:.1f} s"
    assert "measured now" in out
    assert "Stock servers (the naive side)" in out


def test_demo_server_not_installed_gets_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server asked for but not installed is skipped with a note line, not an error."""
    monkeypatch.setattr(_demo, "CASES", ())
    lines: list[str] = []
    rows = _demo.run_demo(["asyncio"], 1, servers=[], skipped=["hypercorn"], out=lines.append)
    assert rows == []
    assert "note: hypercorn is not installed: its rows are skipped." in lines


def _row(close: str, lost: int, delivered: int = 3, case: int = 0) -> Row:
    return Row(CASES[case], "asyncio", close, Tally(delivered=delivered, lost=lost), 0.1)  # type: ignore[arg-type]


def test_demo_summary_fails_when_aiograceful_loses() -> None:
    """The exit status depends only on aiograceful's rows: one loss there fails the demo."""
    ok, text = summary([_row(NAIVE, 3, 0), _row(GRACEFUL, 1, 2)])
    assert not ok
    assert "aiograceful did NOT deliver everything: H1 on asyncio (lost 1 replies)" in text
    ok, text = summary([_row(NAIVE, 0, 3), _row(GRACEFUL, 0, 3)])
    assert ok  # a naive case that happened not to lose does not fail the demo
    assert text.splitlines()[0] == "The naive side lost nothing. It delivered everything in H1."


def test_demo_summary_names_rows_per_unit() -> None:
    """The summary groups rows by unit; it never adds replies to bytes."""
    h6 = next(i for i, case in enumerate(CASES) if case.label == "H6 timed")
    rows = [
        _row(NAIVE, 3, 0),
        _row(GRACEFUL, 0, 3),
        _row(NAIVE, 1000, 24, case=h6),
        _row(GRACEFUL, 0, 1024, case=h6),
    ]
    ok, text = summary(rows)
    assert ok
    naive, last = text.splitlines()
    assert naive == "The naive side lost replies in H1; bytes in H6 timed."
    assert last == "aiograceful delivered everything: replies in H1; bytes in H6 timed."
