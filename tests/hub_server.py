"""A real, local Hugging Face Hub for the tests: olah serving git repositories, plus an upload endpoint.

Downloads go through **olah** (a self-hosted Hugging Face mirror, installed with the ``test`` extra) started in
offline mode with ``mirrors-path``: it serves every git repository at ``<mirrors>/models/<org>/<name>`` through the
Hub's HTTP API (``/{repo}/resolve/{rev}/{file}`` HEAD and GET with ``x-repo-commit`` and ``etag``,
``/api/models/{repo}/revision/{rev}``), which is what ``hf_hub_download``, ``snapshot_download`` and timm's
``hf-hub:`` loading call. Nothing is mocked on the client side: only the endpoint changes.

olah is read-only (a mirror has no upload API), so :class:`UploadServer` implements the four endpoints that
``HfApi.create_repo`` and ``HfApi.upload_folder`` of huggingface_hub 2.4 call (``/api/repos/create``,
``/api/validate-yaml``, ``/api/models/{repo}/preupload/{rev}``, ``/api/models/{repo}/commit/{rev}``), for files
sent inline ("regular" upload mode, no LFS/Xet), and commits them into the same git repositories that olah serves.
It checks for a bearer token and records the ones it receives.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Optional

GIT_ID = ["-c", "user.name=ncl-hub tests", "-c", "user.email=tests@ncl-hub.invalid", "-c", "commit.gpgsign=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def olah_cli() -> Optional[str]:
    """Path of the olah-cli script of this interpreter's environment, or None."""
    here = Path(sys.executable).parent / "olah-cli"
    return str(here) if here.exists() else shutil.which("olah-cli")


def point_hub_to(monkeypatch, endpoint: str, offline: bool = False) -> None:
    """Make huggingface_hub (this process, and subprocesses through the environment) use ``endpoint``.

    huggingface_hub 2.4 reads HF_ENDPOINT and HF_HUB_OFFLINE once, at import, into ``huggingface_hub.constants``;
    every download and HfApi call reads those constants at call time, so patching them is enough here.
    """
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *GIT_ID, *args], cwd=repo, check=True, capture_output=True, text=True)
    return out.stdout.strip()


def commit_files(repo: Path, files: dict, message: str, replace: bool = False) -> str:
    """Write ``{path: bytes}`` (None deletes) into the git repo at ``repo`` (created if needed) and commit."""
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q", "-b", "main")
    if replace:
        for item in repo.iterdir():
            if item.name != ".git":
                shutil.rmtree(item) if item.is_dir() else item.unlink()
    for path, content in files.items():
        target = repo / path
        if content is None:
            target.unlink(missing_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "--allow-empty", "-m", message)
    return _git(repo, "rev-parse", "HEAD")


class LocalHub:
    """olah in offline mode over local git repositories; ``endpoint`` is its base URL."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.mirrors = self.root / "mirrors"
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.root / "olah.log"

    def repo_dir(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def add_repo(self, repo_id: str, folder: Path, message: str = "add export") -> str:
        """Commit every file of ``folder`` as the content of ``repo_id`` (replacing what was there)."""
        files = {p.relative_to(folder).as_posix(): p.read_bytes() for p in Path(folder).rglob("*") if p.is_file()}
        return commit_files(self.repo_dir(repo_id), files, message, replace=True)

    def start(self, timeout: float = 60.0) -> "LocalHub":
        cli = olah_cli()
        if cli is None:
            raise RuntimeError("olah-cli not found: install the test extra (pip install -e '.[test]')")
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "127.0.0.1"\nport = {self.port}\n'
            f'repos-path = "{self.root / "olah-cache"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            "metadata-cache-ttl = 0\n"
            "[accessibility]\noffline = true\n",
            encoding="utf-8",
        )
        log = self.log.open("w")
        self.proc = subprocess.Popen([cli, "-c", str(config), "--log-path", str(self.root / "logs")], cwd=self.root,
                                     stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"olah exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"olah did not listen on port {self.port} within {timeout} s:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


class UploadServer:
    """The Hub's write API for small files, committing into ``hub``'s git repositories."""

    def __init__(self, hub: LocalHub):
        self.hub = hub
        self.tokens: List[str] = []
        self.requests: List[str] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.lock = threading.Lock()

    def start(self) -> "UploadServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def _reply(self, status: int, body: dict, headers: Optional[dict] = None) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                path = self.path.split("?")[0]
                outer.requests.append(f"POST {path}")
                auth = self.headers.get("Authorization", "")
                if not auth.startswith("Bearer ") or len(auth) <= len("Bearer "):
                    return self._reply(401, {"error": "Invalid credentials in Authorization header"})
                outer.tokens.append(auth[len("Bearer "):])
                parts = path.strip("/").split("/")
                with outer.lock:
                    if path == "/api/repos/create":
                        return self._create(json.loads(body))
                    if path == "/api/validate-yaml":
                        return self._reply(200, {"errors": [], "warnings": []})
                    if len(parts) == 6 and parts[:2] == ["api", "models"] and parts[4] in ("preupload", "commit"):
                        repo_id = f"{parts[2]}/{parts[3]}"
                        if not (outer.hub.repo_dir(repo_id) / ".git").exists():
                            return self._reply(404, {"error": "Repository not found"},
                                               {"X-Error-Code": "RepoNotFound"})
                        if parts[4] == "preupload":
                            return self._preupload(json.loads(body))
                        return self._commit(repo_id, body)
                return self._reply(404, {"error": f"not implemented: {path}"})

            def _create(self, payload: dict):
                repo_id = f"{payload['organization']}/{payload['name']}"
                repo = outer.hub.repo_dir(repo_id)
                if (repo / ".git").exists():
                    return self._reply(409, {"error": "You already created this model repo", "url":
                                             f"{outer.endpoint}/{repo_id}"})
                commit_files(repo, {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"},
                             "initial commit")
                return self._reply(200, {"url": f"{outer.endpoint}/{repo_id}", "name": repo_id})

            def _preupload(self, payload: dict):
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                         for f in payload["files"]]
                return self._reply(200, {"files": files, "commitOid": None})

            def _commit(self, repo_id: str, body: bytes):
                files, summary = {}, "upload"
                for line in body.decode().splitlines():
                    if not line.strip():
                        continue
                    item = json.loads(line)
                    key, value = item["key"], item["value"]
                    if key == "header":
                        summary = value.get("summary") or summary
                    elif key == "file":
                        files[value["path"]] = base64.b64decode(value["content"])
                    elif key in ("deletedFile", "deletedFolder"):
                        files[value["path"]] = None
                    else:
                        return self._reply(400, {"error": f"unsupported commit operation {key!r}"})
                sha = commit_files(outer.hub.repo_dir(repo_id), files, summary)
                return self._reply(200, {"success": True, "commitOid": sha,
                                         "commitUrl": f"{outer.endpoint}/{repo_id}/commit/{sha}"})

        return Handler


def grep_tree(root: Path, needle: str, skip_git: bool = True) -> List[str]:
    """Files under ``root`` whose bytes contain ``needle``."""
    hits = []
    for path in Path(root).rglob("*"):
        if skip_git and ".git" in path.parts:
            continue
        if path.is_file() and not path.is_symlink() and needle.encode() in path.read_bytes():
            hits.append(str(path))
        elif path.is_symlink() and path.exists() and needle.encode() in path.resolve().read_bytes():
            hits.append(str(path))
    return hits


def subprocess_env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(extra)
    return env
