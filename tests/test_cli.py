"""The command line: user mistakes give one line on stderr and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest
from _util import free_port

from aiograceful._tools import cli as _cli
from aiograceful._tools import demo as _demo


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "choose a command"),
        (["bogus"], "invalid choice"),
        (["demo", "--rounds", "0"], "must be 1.."),
        (["demo", "--rounds", "many"], "not a whole number"),
        (["demo", "--loop", "trio"], "invalid choice"),
        (["demo", "--frobnicate"], "unrecognized arguments"),
        (["demo", "--servers", "tomcat"], "choose from uvicorn,hypercorn,aiohttp or none"),
        (["demo", "--servers", ","], "choose from"),
        (["probe"], "required: HOST:PORT"),
        (["probe", "localhost"], "expected HOST:PORT"),
        (["probe", "127.0.0.1:http"], "bad port"),
        (["probe", "127.0.0.1:0"], "bad port"),
        (["probe", "127.0.0.1:99999"], "bad port"),
        (["probe", "::1:80"], "brackets"),
        (["probe", "127.0.0.1:80", "--wait", "-1"], "must be more than 0"),
        (["probe", "127.0.0.1:80", "--wait", "nan"], "must be more than 0"),
        (["probe", "127.0.0.1:80", "--body-size", "lots"], "not a size"),
        (["probe", "127.0.0.1:80", "--path", "no-slash"], "must start with /"),
        (["probe", "127.0.0.1:80", "--http", "--send", "x"], "--send is for raw probes"),
    ],
)
def test_cli_usage_error_one_line_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad command line prints one line naming the problem and returns 2."""
    assert _cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1, err
    assert message in err
    assert err.startswith("python -m aiograceful")


def test_cli_unreachable_port_one_line_exit_2() -> None:
    """Probing a loopback port nobody listens on: one line, exit 2, no traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "aiograceful", "probe", f"127.0.0.1:{free_port()}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "cannot connect" in proc.stderr
    assert "refused" in proc.stderr.lower()
    assert "Traceback" not in proc.stdout + proc.stderr


def test_cli_bad_option_in_subprocess_no_traceback() -> None:
    """``python -m aiograceful demo --rounds -3`` exits 2 with one line, as a user sees it."""
    proc = subprocess.run(
        [sys.executable, "-m", "aiograceful", "demo", "--rounds", "-3"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_uvloop_missing_one_line_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Asking for uvloop where it is not installed is a usage error, not a crash."""
    only_asyncio = {"asyncio": _demo.available_loops()["asyncio"]}
    monkeypatch.setattr(_demo, "available_loops", lambda: only_asyncio)
    assert _cli.main(["demo", "--loop", "uvloop"]) == 2
    assert "uvloop is not installed" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "servers", "skipped"),
    [
        (["demo"], ["uvicorn"], []),
        (["demo", "--servers", "aiohttp,uvicorn"], ["uvicorn"], ["aiohttp"]),
        (["demo", "--servers", "none"], [], []),
    ],
)
def test_cli_demo_servers_installed_or_skipped(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], servers: list[str], skipped: list[str]
) -> None:
    """``--servers`` picks the drop-in rows' servers; one not installed is passed on as skipped."""
    seen: dict[str, object] = {}

    def fake_run_demo(loops: object, rounds: object, **kwargs: object) -> list[_demo.Row]:
        seen.update(kwargs)
        return []

    monkeypatch.setattr(_demo, "installed_servers", lambda: ["uvicorn"])
    monkeypatch.setattr(_demo, "run_demo", fake_run_demo)
    assert _cli.main([*argv, "--loop", "asyncio"]) == 0
    assert seen["servers"] == servers
    assert seen["skipped"] == skipped


def test_cli_demo_help_lists_what_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's help names every hazard it runs, and the stock servers."""
    with pytest.raises(SystemExit):
        _cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "H1-H7" in text
    for name in ("uvicorn", "hypercorn", "aiohttp", "--servers"):
        assert name in text


@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"], ["probe", "--help"]])
def test_cli_help_exits_0(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` prints usage and exits 0."""
    with pytest.raises(SystemExit) as exc:
        _cli.main(argv)
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
