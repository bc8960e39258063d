"""Every status the API server ever held for a kind's objects in one namespace, seen through a watch.

:class:`StatusWatch` lists the objects, then watches from the list's resourceVersion in a thread,
re-watching from the last version it saw whenever the server ends a watch; nothing in between is
missed, so each object's history is every version the API server stored, in order. The tests read it to
show that no status went backwards or lost what it had.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from realcluster.control_plane import ControlPlane

TOO_MANY_REQUESTS = 429
WATCH_WINDOW_S = 5  # the server ends each watch this often, so the thread notices it is asked to stop


@dataclass(frozen=True)
class SeenVersion:
    resource_version: int
    event: str  # ADDED, MODIFIED, DELETED (LISTED for what the first list returned)
    status: dict[str, Any]
    finalizers: tuple[str, ...]
    deleting: bool


@dataclass
class StatusWatch:
    plane: ControlPlane
    namespace: str
    plurals: tuple[str, ...]
    group_version: str = "/apis/kubetune.dev/v1alpha1"
    histories: dict[tuple[str, str], list[SeenVersion]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> StatusWatch:
        for plural in self.plurals:
            thread = threading.Thread(target=self._watch, args=(plural,), name=f"watch-{plural}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=WATCH_WINDOW_S * 4)
        assert not any(thread.is_alive() for thread in self._threads), "a status watch did not stop"
        assert self.errors == [], f"the status watch failed: {self.errors}"

    def history(self, plural: str, name: str) -> list[SeenVersion]:
        with self._lock:
            return list(self.histories[(plural, name)])

    def _record(self, plural: str, event: str, obj: dict[str, Any]) -> int:
        metadata = obj["metadata"]
        version = int(metadata["resourceVersion"])
        seen = SeenVersion(
            resource_version=version,
            event=event,
            status=dict(obj.get("status") or {}),
            finalizers=tuple(metadata.get("finalizers") or ()),
            deleting="deletionTimestamp" in metadata,
        )
        with self._lock:
            self.histories[(plural, metadata["name"])].append(seen)
        return version

    def _watch(self, plural: str) -> None:
        url = f"{self.group_version}/namespaces/{self.namespace}/{plural}"
        try:
            with self.plane.admin_http() as http:
                listed = http.get(url)
                while listed.status_code == TOO_MANY_REQUESTS:
                    time.sleep(float(listed.headers.get("Retry-After") or 1))
                    listed = http.get(url)
                listed.raise_for_status()
                body = listed.json()
                for obj in body["items"]:
                    self._record(plural, "LISTED", obj)
                version = body["metadata"]["resourceVersion"]
                while not self._stop.is_set():
                    params = {"watch": "1", "resourceVersion": version, "timeoutSeconds": str(WATCH_WINDOW_S)}
                    with http.stream("GET", url, params=params, timeout=WATCH_WINDOW_S * 6) as stream:
                        if stream.status_code == TOO_MANY_REQUESTS:  # the API server sheds load: come back
                            time.sleep(float(stream.headers.get("Retry-After") or 1))
                            continue
                        stream.raise_for_status()
                        for line in stream.iter_lines():
                            if not line:
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":  # e.g. 410 Gone: history was compacted
                                raise RuntimeError(f"watch of {plural} ended with {event['object']}")
                            if event["type"] == "BOOKMARK":
                                continue
                            version = str(self._record(plural, event["type"], event["object"]))
        except Exception as exc:  # reported by stop(), in the test's thread
            self.errors.append(f"{plural}: {type(exc).__name__}: {exc}")
