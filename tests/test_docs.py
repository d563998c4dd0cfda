"""Every code block of README.md and docs/ stays true: python is compiled and run, the rest parsed.

A ``python`` block is compiled (top-level ``await`` allowed), the names it
takes from aiograceful must exist, and it is run by the test that
:data:`RUN` names for it (the README's quick starts: ``test_readme.py``);
a block no test runs fails :func:`test_docs_every_python_block_is_run`. An
``sh`` block must parse (``bash -n``), and the modules, scripts and
aiograceful names it uses must exist. ``yaml`` and ``ini`` blocks must parse.
``text`` blocks are sample output, shown as printed.
"""

from __future__ import annotations

import ast
import asyncio
import configparser
import dataclasses
import importlib
import importlib.util
import re
import shlex
import shutil
import socket
import subprocess
import types
from collections.abc import AsyncIterator, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from _util import wait_until
from prometheus_client import generate_latest

import aiograceful
import aiograceful.otel
import aiograceful.prometheus
from aiograceful._shutdown import LOST_WAIT

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").rglob("*.md"))]
LANGUAGES = {"python", "sh", "yaml", "ini", "text"}
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```[ \t]*$", flags=re.M | re.S)
#: A name taken from aiograceful in a block: ``aiograceful.uvicorn.run``,
#: ``aiograceful.uvicorn:H11Protocol`` (an import string).
NAME = re.compile(r"\baiograceful(?:[.:][A-Za-z_]\w*)+")

#: The shutdown's own short waits after the force (``_shutdown``, ``_server``,
#: ``_registry``): the force's extra 0.1 s, then ``connection_lost``, the
#: handlers' tasks, those cancelled, and one listener's close, each LOST_WAIT.
SHORT_WAITS = 0.1 + 4 * LOST_WAIT


@dataclasses.dataclass(frozen=True)
class Block:
    page: str
    line: int
    language: str
    code: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def all_blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(str(page.relative_to(ROOT)), line, match.group(1), match.group(2)))
    return found


BLOCKS = all_blocks()


def of(language: str) -> list[Block]:
    return [b for b in BLOCKS if b.language == language]


def block(containing: str) -> Block:
    """The one python block that contains ``containing``."""
    found = [b for b in of("python") if containing in b.code]
    assert len(found) == 1, f"{containing!r}: {[str(b) for b in found]}"
    return found[0]


def compiled(code: str, name: str) -> Any:
    return compile(code, name, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)


async def run(code: str, namespace: dict[str, Any], name: str) -> None:
    """Run ``code`` in ``namespace`` as a module would, awaiting it if it awaits at top level."""
    result = eval(compiled(code, name), namespace)
    if asyncio.iscoroutine(result):
        await result


def replaced(code: str, changes: dict[str, str]) -> str:
    """``code`` with each of ``changes`` made; each must be there to change."""
    for old, new in changes.items():
        assert old in code, old
        code = code.replace(old, new)
    return code


def resolve(dotted: str) -> object:
    """The object ``aiograceful.module.Name`` or ``aiograceful.module:Name`` names."""
    first, *rest = dotted.replace(":", ".").split(".")
    obj: object = importlib.import_module(first)
    name = first
    for part in rest:
        name += "." + part
        if isinstance(obj, types.ModuleType) and not hasattr(obj, part):
            importlib.import_module(name)  # a submodule, imported on first use
        obj = getattr(obj, part)
    return obj


#: Every python block, by a text only it contains, and the test that runs it.
RUN = {
    "def content_length(": "test_readme.py::test_readme_streams_quick_start_works",
    "class LineServer(GracefulProtocol)": "test_readme.py::test_readme_protocol_quick_start_works",
    'handoff="/run/myapp/handoff.sock"': "test_docs_handoff_snippet_hands_over_to_a_successor",
    "aiograceful.listen_fds()": "test_docs_listen_fds_snippet_serves_either_socket",
    "GET /ready": "test_docs_kubernetes_readiness_fails_from_the_notice",
    "aiograceful.prometheus.register": "test_docs_exporter_snippets_export_a_server",
    "aiograceful.otel.observe": "test_docs_exporter_snippets_export_a_server",
    # A drop-in's entry point, with its server's own signature: running it
    # needs an application and serves until SIGTERM. The test checks it
    # compiles and that what it names exists (test_docs_python_blocks_compile).
    "aiograceful.hypercorn.serve(app, config)": "test_docs_python_blocks_compile",
    "aiograceful.aiohttp.run_app(app, host=..., port=...)": "test_docs_python_blocks_compile",
}


# -- every block ----------------------------------------------------------------------


def test_docs_every_fence_has_a_known_language() -> None:
    """Every code block says what it is, so that it is checked as what it is."""
    assert BLOCKS
    unknown = [f"{b} ({b.language or 'none'})" for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown


@pytest.mark.parametrize("snippet", of("python"), ids=str)
def test_docs_python_blocks_compile(snippet: Block) -> None:
    """A python block compiles, and every aiograceful name it uses exists."""
    compiled(snippet.code, str(snippet))
    for name in NAME.findall(snippet.code):
        resolve(name)


def test_docs_every_python_block_is_run() -> None:
    """Each python block is claimed by exactly one entry of RUN, and each entry by a block."""
    for snippet in of("python"):
        claims = [key for key in RUN if key in snippet.code]
        assert len(claims) == 1, f"{snippet}: claimed by {claims}"
    for key in RUN:
        assert any(key in b.code for b in of("python")), f"RUN[{key!r}] claims no block"


def shell_lines(snippet: Block) -> Iterator[list[str]]:
    for line in snippet.code.splitlines():
        command = line.partition(" #")[0].strip()
        if command and not command.startswith("#"):
            yield shlex.split(command, comments=True)


@pytest.mark.parametrize("snippet", of("sh"), ids=str)
def test_docs_shell_blocks_parse_and_name_what_exists(snippet: Block) -> None:
    """An sh block parses, and its `python -m` modules, scripts and aiograceful names exist."""
    bash = shutil.which("bash")
    if bash is not None:
        subprocess.run([bash, "-n"], input=snippet.code, text=True, check=True)
    for words in shell_lines(snippet):
        for i, word in enumerate(words[:-1]):
            if word == "python" and words[i + 1] == "-m":
                assert importlib.util.find_spec(words[i + 2]) is not None, words
            elif word == "python" and words[i + 1].endswith(".py"):
                assert (ROOT / words[i + 1]).is_file(), words
    for name in NAME.findall(snippet.code):
        resolve(name)


@pytest.mark.parametrize("snippet", of("yaml"), ids=str)
def test_docs_yaml_blocks_parse(snippet: Block) -> None:
    """A yaml block is YAML (PyYAML comes with mkdocs, in the dev extra)."""
    yaml = pytest.importorskip("yaml")
    assert list(yaml.safe_load_all(snippet.code))


@pytest.mark.parametrize("snippet", of("ini"), ids=str)
def test_docs_ini_blocks_parse(snippet: Block) -> None:
    """An ini block (a systemd unit) parses as sections of keys."""
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment, method-assign]  # systemd's keys are cased
    parser.read_string(snippet.code)
    assert parser.sections()


# -- the runs -------------------------------------------------------------------------


async def exchange(port: int, request: bytes) -> bytes:
    """Send ``request`` (b"": none) and our FIN on a new connection; read until the server's."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()


@pytest.fixture
def capture_servers(monkeypatch: pytest.MonkeyPatch) -> list[aiograceful.GracefulServer]:
    """The servers that ``aiograceful.start_server`` makes while the test runs."""
    made: list[aiograceful.GracefulServer] = []
    start = aiograceful.start_server

    async def recording(*args: Any, **kwargs: Any) -> aiograceful.GracefulServer:
        server = await start(*args, **kwargs)
        made.append(server)
        return server

    monkeypatch.setattr(aiograceful, "start_server", recording)
    return made


async def test_docs_handoff_snippet_hands_over_to_a_successor(sock_dir: Path) -> None:
    """The handoff snippet run twice: the second takes the first's listener, which then returns."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hi\n")

    path = str(sock_dir / "handoff.sock")
    code = replaced(
        block('handoff="/run/myapp/handoff.sock"').code,
        {'"0.0.0.0", 8080': '"127.0.0.1", 0', "/run/myapp/handoff.sock": path},
    )
    first: dict[str, Any] = {"aiograceful": aiograceful, "handler": handler}
    second: dict[str, Any] = {"aiograceful": aiograceful, "handler": handler}
    predecessor = asyncio.ensure_future(run(code, first, "handoff"))
    try:
        async with asyncio.timeout(10):
            await wait_until(lambda: "server" in first, 5, what="the first server started")
            port = first["server"].sockets[0].getsockname()[1]
            assert await exchange(port, b"") == b"hi\n"
            successor = asyncio.ensure_future(run(code, second, "handoff"))
            await predecessor  # serve_forever returned: a successor took over
            assert first["server"].handed_off
            assert second["server"].sockets[0].getsockname()[1] == port
            assert await exchange(port, b"") == b"hi\n"
            await second["server"].shutdown()
            await successor
    finally:
        for namespace in (first, second):
            if "server" in namespace:
                await namespace["server"].shutdown()


async def test_docs_listen_fds_snippet_serves_either_socket(
    monkeypatch: pytest.MonkeyPatch, capture_servers: list[aiograceful.GracefulServer]
) -> None:
    """The socket-activation snippet serves systemd's socket if passed one, else binds its own."""
    code = replaced(block("aiograceful.listen_fds()").code, {'"0.0.0.0", 8080': '"127.0.0.1", 0'})
    listener = socket.create_server(("127.0.0.1", 0))
    systemds = listener.getsockname()[1]
    for passed in ([listener], []):

        def listen_fds(passed: list[socket.socket] = passed) -> list[socket.socket]:
            return passed

        monkeypatch.setattr(aiograceful, "listen_fds", listen_fds)
        namespace: dict[str, Any] = {"__name__": "docs_listen_fds"}
        await run(code, namespace, "listen_fds")
        made = len(capture_servers) + 1

        def started(count: int) -> bool:
            return len(capture_servers) == count

        serving = asyncio.ensure_future(namespace["main"]())
        try:
            async with asyncio.timeout(10):
                await wait_until(partial(started, made), 5, what="a server started")
                server = capture_servers[-1]
                port = server.sockets[0].getsockname()[1]
                assert (port == systemds) == bool(passed)
                assert await exchange(port, b"") == b"hello\n"
                await server.shutdown()
                await serving
        finally:
            serving.cancel()
    listener.close()


@pytest.fixture
def kubernetes_app() -> dict[str, Any]:
    """The Kubernetes page's application, as a module (not run as __main__)."""
    namespace: dict[str, Any] = {"__name__": "docs_kubernetes"}
    exec(compiled(block("GET /ready").code, "kubernetes"), namespace)
    return namespace


def manifests() -> Iterator[dict[str, Any]]:
    yaml = pytest.importorskip("yaml")
    for snippet in of("yaml"):
        if "docs/kubernetes.md" in snippet.page:
            yield from yaml.safe_load_all(snippet.code)


def pod_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = manifest["spec"]
    return spec["template"]["spec"] if manifest["kind"] == "Deployment" else spec


def test_docs_kubernetes_budget_adds_up(kubernetes_app: dict[str, Any]) -> None:
    """A manifest's grace period covers its preStop sleep, the shutdown's bounds and 1 s more."""
    found = list(manifests())
    assert {m["kind"] for m in found} == {"Deployment", "Pod"}
    page = (ROOT / "docs" / "kubernetes.md").read_text()
    assert f"{SHORT_WAITS:.1f} s" in page
    assert f"+ {SHORT_WAITS:.1f} s" in (ROOT / "docs" / "server.md").read_text()
    for manifest in found:
        spec = pod_spec(manifest)
        (container,) = spec["containers"]
        pre_stop = 0.0
        drain_delay = kubernetes_app["DRAIN_DELAY"]
        if "lifecycle" in container:  # the preStop variant: drain_delay=0 there
            command = container["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep"
            pre_stop, drain_delay = float(command[1]), 0.0
        needed = (
            pre_stop
            + drain_delay
            + kubernetes_app["GRACE"]
            + aiograceful.DEFAULT_FORCE_TIMEOUT
            + SHORT_WAITS
        )
        assert spec["terminationGracePeriodSeconds"] >= needed + 1.0, manifest["kind"]
        probe = container["readinessProbe"]["httpGet"]
        assert probe["path"] == "/ready"


async def test_docs_kubernetes_readiness_fails_from_the_notice(
    kubernetes_app: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The app answers /ready 200, then 503 from the notice on while drain_delay still accepts."""
    kubernetes_app["DRAIN_DELAY"] = 0.5  # the page's 5 s, shortened for the test
    kubernetes_app["GRACE"] = 2.0
    server = await kubernetes_app["serve"]("127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ready = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ready.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await exchange(port, b"") == b""  # a TCP probe: no request, no answer
        shutdown = asyncio.ensure_future(server.shutdown())
        await asyncio.sleep(0.1)
        assert server.notice.is_set()
        ready = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ready.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        hello = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert hello.endswith(b"\r\n\r\nhello\n")
        report = await asyncio.wait_for(shutdown, 10)
        assert report.forced == 0
    finally:
        await server.shutdown()
    assert not [r for r in caplog.records if r.name.startswith("aiograceful")], caplog.text


@pytest.fixture
async def plain_server() -> AsyncIterator[aiograceful.GracefulServer]:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    server = await aiograceful.start_server(handler, "127.0.0.1", 0)
    async with server:
        yield server


async def test_docs_exporter_snippets_export_a_server(
    plain_server: aiograceful.GracefulServer,
) -> None:
    """The metrics page's lines export a server (prometheus_client's REGISTRY, global otel)."""
    exec(block("aiograceful.prometheus.register").code, {"server": plain_server})
    try:
        assert 'aiograceful_connections_active{server="api"} 0.0' in generate_latest().decode()
    finally:
        aiograceful.prometheus.unregister(plain_server)
    exec(block("aiograceful.otel.observe").code, {"server": plain_server})
    aiograceful.otel.unobserve(plain_server)  # raises if the snippet had not observed it


def test_docs_api_reference_lists_every_public_name() -> None:
    """The API page documents exactly aiograceful.__all__, and every public module has a page."""
    page = (ROOT / "docs" / "api" / "aiograceful.md").read_text()
    members = re.findall(r"^        - (\w+)$", page, flags=re.M)
    assert sorted(members) == sorted(aiograceful.__all__)
    pages = "".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    for module in ("uvicorn", "hypercorn", "aiohttp", "gunicorn", "prometheus", "otel"):
        assert f"::: aiograceful.{module}\n" in pages, module
