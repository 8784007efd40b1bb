"""A loopback stand-in for the few Hugging Face Hub endpoints an upload uses, recording what it receives.

It answers repo creation, branch creation, README metadata validation, preupload (every file "regular", so its
bytes travel inside the commit), the commit itself (ndjson), repo info, and file downloads of what was
committed. Committed files are written under `root/<org>/<name>/`, a folder that then loads like any
local model folder. Repos in `forbidden` answer 403 to everything, as the Hub does for a token without write
access there.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class HubStandIn:
    def __init__(self, root: Path, forbidden: tuple[str, ...] = ()):
        self.root = Path(root)
        self.forbidden = set(forbidden)
        self.created: list[dict] = []
        self.commits: list[dict] = []
        self.authorizations: set[str] = set()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        # shutdown() waits for serve_forever's next poll: at its default half second, every test paid that at teardown
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)

    def __enter__(self) -> "HubStandIn":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def folder(self, repo_id: str) -> Path:
        return self.root / repo_id

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output clean
                pass

            def _reply(self, status: int, body=None, headers: dict | None = None, raw: bytes | None = None):
                data = raw if raw is not None else json.dumps(body if body is not None else {}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json" if raw is None else "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _denied(self, repo_id: str) -> bool:
                hub.authorizations.add(self.headers.get("Authorization", ""))
                if repo_id in hub.forbidden:
                    self._reply(403, {"error": f"You don't have the rights to write to {repo_id}"})
                    return True
                return False

            def do_POST(self):
                body = self._body()
                if self.path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    if self._denied(repo_id):
                        return
                    hub.created.append(payload)
                    return self._reply(200, {"url": f"{hub.url}/{repo_id}"})
                if self.path == "/api/validate-yaml":
                    return self._reply(200, {})
                match = re.match(r"^/api/models/([^/]+/[^/]+)/(preupload|commit|branch)/([^?]+)", self.path)
                if not match:
                    return self._reply(404, {"error": f"stand-in has no {self.path}"})
                repo_id, action, revision = match.groups()
                if self._denied(repo_id):
                    return
                if action == "branch":
                    return self._reply(200, {})
                if action == "preupload":
                    files = json.loads(body)["files"]
                    return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                files = {}
                for line in lines:
                    if line["key"] == "file":
                        value = line["value"]
                        files[value["path"]] = base64.b64decode(value["content"])
                for path, data in files.items():
                    target = hub.folder(repo_id) / path
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(data)
                header = next(line["value"] for line in lines if line["key"] == "header")
                hub.commits.append({"repo_id": repo_id, "revision": revision, "summary": header.get("summary"), "files": sorted(files)})
                return self._reply(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{COMMIT}", "commitOid": COMMIT, "pullRequestUrl": None})

            def do_GET(self):
                match = re.match(r"^/api/models/([^/]+/[^/?]+)", self.path)
                if match:
                    repo_id = match.group(1)
                    if self._denied(repo_id):
                        return
                    if not hub.folder(repo_id).is_dir():
                        return self._reply(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                    return self._reply(200, {"id": repo_id, "sha": COMMIT, "siblings": []})
                match = re.match(r"^/([^/]+/[^/]+)/resolve/[^/]+/(.+)$", self.path)
                if match:
                    repo_id, path = match.groups()
                    target = hub.folder(repo_id) / path
                    if not target.is_file():
                        return self._reply(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                    data = target.read_bytes()
                    return self._reply(200, raw=data, headers={"X-Repo-Commit": COMMIT, "ETag": f'"{COMMIT}"'})
                return self._reply(404, {"error": f"stand-in has no {self.path}"})

            do_HEAD = do_GET

        return Handler
