"""The README stays short and true: its commands are CI's, its quick starts are run.

The README's other code blocks, and the docs', are checked by test_docs.py.
"""

from __future__ import annotations

import asyncio
import http.client
import re
from pathlib import Path
from typing import Any

import pytest

import aiograceful

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quick_start(title: str) -> dict[str, Any]:
    """Execute the README's quick start under ``title``, all but its ``asyncio.run(main())``."""
    text = README.read_text()
    section = text[text.index(f"## Quick start: {title}") :]
    source = re.search(r"```python\n(.*?)```", section, flags=re.S)
    assert source is not None
    code = source.group(1)
    assert code.rstrip().endswith("asyncio.run(main())")
    namespace: dict[str, Any] = {"__name__": f"readme_{title}"}
    exec(compile(code.rstrip().removesuffix("asyncio.run(main())"), title, "exec"), namespace)
    return namespace


def test_readme_is_at_most_300_lines() -> None:
    """The README is an introduction; the rest lives in docs/."""
    assert len(README.read_text().splitlines()) <= 300


def test_readme_gives_the_two_commands() -> None:
    """The README keeps the main-job command, the test command and the install command."""
    text = README.read_text()
    assert "python -m aiograceful demo" in text
    assert "python -m pytest" in text
    assert 'pip install -e ".[dev]"' in text


def test_readme_commands_are_the_ci_commands() -> None:
    """.ci/run installs and tests with the README's commands, and builds the docs strictly."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert '-m pip install -q -e ".[dev]"' in ci
    assert 'step "pytest" "$venv/bin/python" -m pytest\n' in ci
    assert 'mkdocs" build --strict' in ci


async def test_readme_protocol_quick_start_works() -> None:
    """The protocol quick start answers lines, and after the client's FIN says bye, then EOF."""
    line_server = quick_start("protocols")["LineServer"]
    server = await aiograceful.create_server(line_server, "127.0.0.1", 0, grace=2)
    async with server:
        port = server.sockets[0].getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"a\nb\n")
        assert await reader.readexactly(10) == b"ok a\nok b\n"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"bye\n"
        writer.close()


def post(port: int, body: bytes) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/", body=body)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


async def test_readme_streams_quick_start_works() -> None:
    """The streams quick start echoes a small body and delivers its early 413 to a big upload."""
    handle = quick_start("streams")["handle"]
    server = await aiograceful.start_server(handle, "127.0.0.1", 0, grace=2)
    async with server:
        port = server.sockets[0].getsockname()[1]
        assert await asyncio.to_thread(post, port, b"hello") == (200, b"hello")
        status, _ = await asyncio.to_thread(post, port, b"x" * (4 << 20))
        assert status == 413


async def connect_and_leave(port: int, *, half: bytes = b"") -> None:
    """A health check or port scan: connect, send ``half`` (maybe nothing), and leave."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(half)
    writer.write_eof()
    await asyncio.wait_for(reader.read(), 5)
    writer.close()
    await writer.wait_closed()


def assert_nothing_logged(caplog: pytest.LogCaptureFixture) -> None:
    """No record from aiograceful's loggers (a traceback for a client that left, say)."""
    assert not [r for r in caplog.records if r.name.startswith("aiograceful")], caplog.text


async def test_readme_streams_quick_start_is_quiet_when_a_client_sends_no_request(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that leaves without a request, or halfway through one, logs nothing."""
    handle = quick_start("streams")["handle"]
    server = await aiograceful.start_server(handle, "127.0.0.1", 0, grace=2)
    async with server:
        port = server.sockets[0].getsockname()[1]
        await connect_and_leave(port)
        await connect_and_leave(port, half=b"POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        await connect_and_leave(port, half=b"GET / HTTP/1.1\r\n")
    assert_nothing_logged(caplog)


async def test_readme_protocol_quick_start_is_quiet_when_a_client_sends_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that connects and leaves gets the bye and the close, and nothing is logged."""
    line_server = quick_start("protocols")["LineServer"]
    server = await aiograceful.create_server(line_server, "127.0.0.1", 0, grace=2)
    async with server:
        await connect_and_leave(server.sockets[0].getsockname()[1])
    assert_nothing_logged(caplog)
