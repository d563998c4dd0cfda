"""Test configuration: every async test runs on asyncio's loop and on uvloop.

The loop's exception handler is replaced for each async test; anything that
reaches it (an exception in a callback, a never-retrieved future, a
transport that failed) fails the test.
"""

from __future__ import annotations

import asyncio
import ssl
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import uvloop
from _util import make_cert


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(autouse=True)
async def loop_exception_guard() -> AsyncIterator[list[dict[str, Any]]]:
    """Fail the test if anything reached the running loop's exception handler."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.append(context)

    previous = loop.get_exception_handler()
    loop.set_exception_handler(handler)
    try:
        yield seen
        # Let callbacks scheduled by the test's last step run before judging.
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(previous)
    if seen:
        messages = "; ".join(f"{ctx.get('message')}: {ctx.get('exception')!r}" for ctx in seen)
        pytest.fail(f"the loop's exception handler was called: {messages}")


@pytest.fixture(scope="session")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, as files (needs openssl)."""
    made = make_cert(Path(tmp_path_factory.mktemp("tls")))
    if made is None:
        pytest.skip("openssl is not installed: cannot make a test certificate")
    return made


@pytest.fixture(scope="session")
def tls_contexts(tls_files: tuple[Path, Path]) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server and a client SSLContext around a self-signed certificate (needs openssl)."""
    cert, key = tls_files
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert, key)
    client = ssl.create_default_context(cafile=str(cert))
    return server, client


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A short directory for Unix socket paths (tmp_path can exceed sun_path's 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="aiog-") as name:
        yield Path(name)
