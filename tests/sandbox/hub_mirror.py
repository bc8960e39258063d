"""A Hugging Face Hub mirror of local model directories: ``HF_ENDPOINT`` for pods with no internet.

``python hub_mirror.py --port 5000 --repo kubetune/tiny-base=/path/to/model`` serves, at one commit per
repository, what ``huggingface_hub.snapshot_download`` asks the Hub for: the revision's info
(``/api/models/<repo>/revision/<rev>``), its file tree (``/api/models/<repo>/tree/<rev>``) and each
file (``HEAD``/``GET /<repo>/resolve/<rev>/<file>``, with the commit and ETag headers the client
checks). Every request is logged to stdout, so a test can tell what was fetched. With ``--token T``
a request without ``Authorization: Bearer T`` is refused (401), as the Hub refuses a gated model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

TINY_BASE_REPO = "kubetune/tiny-base"
"""The name the sandbox tests give the tiny base model on the mirrored hub."""


class Repository:
    def __init__(self, repo_id: str, root: Path) -> None:
        self.repo_id = repo_id
        self.files = {
            path.relative_to(root).as_posix(): path for path in sorted(root.rglob("*")) if path.is_file()
        }
        digest = hashlib.sha1()
        for name, path in self.files.items():
            digest.update(name.encode() + b"\0" + hashlib.sha1(path.read_bytes()).digest())
        self.commit = digest.hexdigest()

    def blob_id(self, name: str) -> str:
        data = self.files[name].read_bytes()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's object id

    def info(self) -> dict[str, Any]:
        siblings = [{"rfilename": name} for name in self.files]
        return {"id": self.repo_id, "modelId": self.repo_id, "sha": self.commit, "siblings": siblings}

    def tree(self) -> list[dict[str, Any]]:
        return [
            {"type": "file", "path": name, "oid": self.blob_id(name), "size": path.stat().st_size}
            for name, path in self.files.items()
        ]


class MirrorHandler(BaseHTTPRequestHandler):
    repositories: dict[str, Repository] = {}
    token: str | None = None

    def _send_json(self, value: Any) -> None:
        body = json.dumps(value).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _find(self, parts: list[str]) -> tuple[Repository, list[str]] | None:
        if len(parts) < 2:
            return None
        repository = self.repositories.get(f"{parts[0]}/{parts[1]}")
        return (repository, parts[2:]) if repository is not None else None

    def _not_found(self) -> None:
        self.send_response(404)
        self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _handle(self, with_body: bool) -> None:
        if self.token is not None and self.headers.get("Authorization") != f"Bearer {self.token}":
            self.send_response(401)
            self.send_header("X-Error-Code", "GatedRepo")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        parts = [unquote(part) for part in urlsplit(self.path).path.strip("/").split("/")]
        if parts[:2] == ["api", "models"]:
            found = self._find(parts[2:])
            if found is None or not found[1]:
                return self._not_found()
            repository, rest = found
            if rest[0] == "revision":
                return self._send_json(repository.info())
            if rest[0] == "tree":
                return self._send_json(repository.tree())
            return self._not_found()
        found = self._find(parts)
        if found is None or len(found[1]) < 3 or found[1][0] != "resolve":
            return self._not_found()
        repository, rest = found
        name = "/".join(rest[2:])
        if name not in repository.files:
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", repository.commit)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        data = repository.files[name].read_bytes()
        self.send_response(200)
        self.send_header("X-Repo-Commit", repository.commit)
        self.send_header("ETag", f'"{repository.blob_id(name)}"')
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)
        return None

    def do_GET(self) -> None:
        self._handle(with_body=True)

    def do_HEAD(self) -> None:
        self._handle(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        print(f"{self.command} {self.path} {args[1] if len(args) > 1 else ''}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--repo", action="append", required=True, help="ORG/NAME=DIRECTORY")
    parser.add_argument("--token", default=None, help="refuse requests without this bearer token")
    args = parser.parse_args()
    MirrorHandler.token = args.token
    for spec in args.repo:
        repo_id, _, directory = spec.partition("=")
        MirrorHandler.repositories[repo_id] = Repository(repo_id, Path(directory))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), MirrorHandler)
    print(f"serving {sorted(MirrorHandler.repositories)} on port {args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
