"""A local stand-in for the Hub's HTTP API, enough for huggingface_hub's `create_repo` and
`upload_folder` (regular, non-LFS files): it records every call and the files committed."""

from __future__ import annotations

import base64
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


class Hub:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []  # method, path, authorization, body (JSON or ndjson rows)
        self.repos: dict[str, dict[str, Any]] = {}  # repo id → the create request's body
        self.files: dict[str, dict[str, bytes]] = {}  # repo id → path → bytes committed
        self.cards: list[dict[str, Any]] = []  # README metadata the client had validated
        self.url = ""


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _reply(self, body: dict[str, Any], status: int = 200) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            path = self.path.split("?")[0]
            ndjson = "ndjson" in self.headers.get("Content-Type", "")
            body = (
                [json.loads(line) for line in raw.splitlines() if line]
                if ndjson
                else json.loads(raw or b"{}")
            )
            hub.calls.append(
                {
                    "method": "POST",
                    "path": path,
                    "authorization": self.headers.get("Authorization"),
                    "body": body,
                }
            )
            parts = path.strip("/").split("/")
            if path == "/api/validate-yaml":  # the client has a README's metadata checked before committing
                meta = (
                    yaml.safe_load(body["content"].split("---\n")[1])
                    if body["content"].startswith("---\n")
                    else None
                )
                if not isinstance(meta, dict):
                    return self._reply({"errors": [{"message": "no YAML metadata"}]}, 400)
                hub.cards.append(meta)
                return self._reply({"warnings": []})
            if path == "/api/repos/create":
                repo = "/".join(p for p in (body.get("organization"), body["name"]) if p)
                hub.repos[repo] = body
                hub.files.setdefault(repo, {})
                return self._reply({"url": f"{hub.url}/{repo}", "name": repo})
            if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("preupload", "commit"):
                repo = f"{parts[2]}/{parts[3]}"
                if repo not in hub.repos:
                    return self._reply({"error": "Repository not found"}, 404)
                if parts[4] == "preupload":
                    files = [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                        for f in body["files"]
                    ]
                    return self._reply({"files": files})
                for row in body:
                    if row["key"] == "file":
                        hub.files[repo][row["value"]["path"]] = base64.b64decode(row["value"]["content"])
                return self._reply(
                    {"commitUrl": f"{hub.url}/{repo}/commit/0123abcd", "commitOid": "0123abcd"}
                )
            self._reply({"error": f"not served here: {path}"}, 404)

    return Handler


@contextmanager
def local_hub():
    """A running `Hub` on 127.0.0.1 (a free port), shut down after the block."""
    hub = Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
