"""The drop-ins' figures: stock server against aiograceful's drop-in, per real client.

    python -m benchmarks.dropins [--rounds 12] [--races 5] [--server uvicorn,hypercorn,aiohttp]

For each server, stock and with the drop-in (asyncio's loop; uvicorn with h11),
in a subprocess on 127.0.0.1:

* early 413: each client uploads 16 MiB ``--rounds`` times to a route that
  answers 413 without reading the body; the table counts the 413s the client
  read (http.client three ways, node, wget, curl ``-H 'Expect:'``, ab; a
  client that is not installed is left out);
* shutdown race: 4 keep-alive http.client clients send GETs back to back,
  SIGTERM after 0.5 s, ``--races`` times; the table counts requests sent on an
  open connection that got no answer.

A measurement, not a test: it prints what it saw and asserts nothing. It uses
the test suite's helpers (``tests/_dropins.py``), so run it from a checkout.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _dropins as d

Client = Callable[[int, int], tuple[int, int]]


def _close(port: int, rounds: int) -> tuple[int, int]:
    return d.httpclient_uploads(port, rounds, "Connection: close")


def _http10(port: int, rounds: int) -> tuple[int, int]:
    return d.httpclient_uploads(port, rounds, "HTTP/1.0")


CLIENTS: list[tuple[str, str | None, Client]] = [
    ("http.client keep-alive", None, d.httpclient_uploads),
    ("http.client Connection: close", None, _close),
    ("http.client HTTP/1.0", None, _http10),
    ("node http", "node", d.node_uploads),
    ("wget", "wget", d.wget_uploads),
    ("curl -H 'Expect:'", "curl", d.curl_uploads),
    ("ab (HTTP/1.0)", "ab", d.ab_uploads),
]


def _argv(server: str, dropin: bool) -> list[str]:
    py = d.python()
    if server == "uvicorn":
        http = "aiograceful.uvicorn:H11Protocol" if dropin else "h11"
        return [
            py, "-m", "uvicorn", "_asgi_app:app", "--host", d.HOST, "--port", "0",
            "--http", http, "--loop", "asyncio", "--no-access-log",
        ]  # fmt: skip
    return [py, "tests/_serve_main.py", server, "dropin" if dropin else "stock", "asyncio"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--races", type=int, default=5)
    parser.add_argument("--server", default="uvicorn,hypercorn,aiohttp")
    args = parser.parse_args()
    for server in args.server.split(","):
        print(f"\n## {server}: early 413, 16 MiB upload, {args.rounds} rounds per client\n")
        print("| client | stock | drop-in |\n|---|---|---|")
        ports: dict[bool, int] = {}
        with (
            d.server_process(_argv(server, False)) as (_p1, ports[False]),
            d.server_process(_argv(server, True)) as (_p2, ports[True]),
        ):
            for name, tool, client in CLIENTS:
                if tool is not None and shutil.which(tool) is None:
                    continue
                cells = []
                for dropin in (False, True):
                    got, total = client(ports[dropin], args.rounds)
                    cells.append(f"{got}/{total}")
                print(f"| {name} | {cells[0]} | {cells[1]} |", flush=True)
        print(f"\n## {server}: shutdown race, 4 keep-alive clients, {args.races} SIGTERMs\n")
        print("| build | requests sent | answered | lost | answers with Connection: close |")
        print("|---|---|---|---|---|")
        for dropin in (False, True):
            sent = answered = lost = closes = 0
            for _ in range(args.races):
                with d.server_process(_argv(server, dropin)) as (proc, port):
                    counts = d.shutdown_race(proc, port)
                sent += counts.sent
                answered += counts.answered
                lost += counts.lost
                closes += counts.closes_announced
            build = "drop-in" if dropin else "stock"
            print(f"| {build} | {sent} | {answered} | {lost} | {closes} |", flush=True)


if __name__ == "__main__":
    main()
