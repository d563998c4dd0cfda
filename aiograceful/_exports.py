"""The servers one metrics exporter reads: ``Sources`` (shared by ``.prometheus`` and ``.otel``).

Both exporters keep one collector per registry (Prometheus) or meter
provider (OpenTelemetry) and read every server added to it: neither can take
two collectors with the same metric names (prometheus_client's registry
refuses the second; an OpenTelemetry SDK hands back the first instrument and
drops the second one's callbacks). So several servers in one process export
side by side as one metric family, told apart by their labels.

A scrape (prometheus_client's HTTP thread, an OpenTelemetry periodic reader)
reads from another thread than the server's loop: the entries are one tuple,
replaced whole under a lock, and a read iterates the tuple it found.
"""

from __future__ import annotations

import importlib.metadata
import re
import threading
from collections.abc import Mapping
from typing import Generic, Protocol, TypeVar

from ._stats import ServerStats

__all__ = ["HasStats", "Sources", "check_version"]

V = TypeVar("V")


class HasStats(Protocol):
    """What an exporter reads: a server with a ``stats`` snapshot (core server and drop-ins)."""

    @property
    def stats(self) -> ServerStats: ...


class Sources(Generic[V]):
    """The servers an exporter reads, each with its own labels (the same label names for all)."""

    __slots__ = ("_entries", "_lock")

    def __init__(self) -> None:
        self._entries: tuple[tuple[HasStats, Mapping[str, V]], ...] = ()
        self._lock = threading.Lock()

    def add(self, source: HasStats, labels: Mapping[str, V]) -> None:
        """Read ``source`` with ``labels`` from now on.

        Raises TypeError if it has no ``stats``, ValueError if it is read
        already, if another source has the same labels (one series each), or
        if the label names differ from the others'.
        """
        if not hasattr(type(source), "stats"):
            raise TypeError(f"{source!r} has no 'stats' (a ServerStats snapshot)")
        labels = dict(labels)
        with self._lock:
            for known, known_labels in self._entries:
                if known is source:
                    raise ValueError(f"{source!r} is exported already")
                if known_labels.keys() != labels.keys():
                    raise ValueError(
                        f"labels {sorted(labels)} differ from the other servers' "
                        f"{sorted(known_labels)}: give every server the same label names"
                    )
                if known_labels == labels:
                    raise ValueError(
                        f"another server is exported with the same labels {labels}: "
                        "give each server its own (e.g. server='api')"
                    )
            self._entries = (*self._entries, (source, labels))

    def remove(self, source: HasStats) -> None:
        """Stop reading ``source`` (ValueError if it was not read)."""
        with self._lock:
            kept = tuple(entry for entry in self._entries if entry[0] is not source)
            if len(kept) == len(self._entries):
                raise ValueError(f"{source!r} is not exported here")
            self._entries = kept

    def read(self) -> list[tuple[ServerStats, Mapping[str, V]]]:
        """One ``stats`` snapshot of each source, with its labels."""
        return [(source.stats, labels) for source, labels in self._entries]

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        labels = [dict(labels) for _, labels in self._entries]
        return f"<Sources {len(self._entries)} servers labels={labels}>"


def check_version(module: str, distribution: str, minimum: tuple[int, int], extra: str) -> None:
    """Raise ImportError naming ``extra`` if ``distribution`` is older than ``minimum``.

    ``module`` (the exporter) names itself in the message. A version that
    does not start with two numbers (a local build) is let through.
    """
    version = importlib.metadata.version(distribution)
    found = re.match(r"(\d+)\.(\d+)", version)
    if found is None:
        return
    if (int(found.group(1)), int(found.group(2))) < minimum:
        wanted = ".".join(map(str, minimum))
        raise ImportError(
            f"{module} needs {distribution} >= {wanted}, found {version}: "
            f"pip install 'aiograceful[{extra}]'"
        )
