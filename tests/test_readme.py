"""The README's commands and quick starts stay true: the quick starts are run, not just read."""

from __future__ import annotations

import asyncio
import http.client
import re
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

import aiograceful
import aiograceful.otel
import aiograceful.prometheus

README = Path(__file__).resolve().parent.parent / "README.md"


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


def test_readme_gives_the_two_commands() -> None:
    """The README keeps the main-job command, the test command and the install command."""
    text = README.read_text()
    assert "python -m aiograceful demo" in text
    assert "python -m pytest" in text
    assert 'pip install -e ".[dev]"' in text


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


def snippet(containing: str) -> str:
    """The README's python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, containing
    return str(found[0])


async def test_readme_exporter_snippets_work() -> None:
    """The README's exporter lines export a server (prometheus_client's REGISTRY, global otel)."""
    server = await aiograceful.start_server(lambda r, w: asyncio.sleep(0), "127.0.0.1", 0)
    async with server:
        exec(snippet("aiograceful.prometheus.register"), {"server": server})
        try:
            assert 'aiograceful_connections_active{server="api"} 0.0' in generate_latest().decode()
        finally:
            aiograceful.prometheus.unregister(server)
        exec(snippet("aiograceful.otel.observe"), {"server": server})
        aiograceful.otel.unobserve(server)  # raises if the snippet had not observed it
