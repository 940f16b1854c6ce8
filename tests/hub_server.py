"""A loopback stand-in for the Hugging Face Hub, for testing the real `huggingface_hub` client offline.

It implements, in memory, only the endpoints the client calls for `create_repo`, `create_commit`
(`validate-yaml`, `preupload`, `commit`), `create_branch`, `repo_info` / `model_info`, `list_repo_tree`,
`snapshot_download` and `hf_hub_download` (HEAD + GET on `resolve`), with the headers
`file_download.py` checks (`X-Repo-Commit`, `ETag`, `Content-Length`) and the `X-Error-Code`
values `hf_raise_for_status` maps to `RepositoryNotFoundError`, `RevisionNotFoundError` and
`EntryNotFoundError`. Every file is committed as a regular git blob (preupload answers
"regular"), so no LFS or Xet storage is involved.

Options: `token` (every request must send `Authorization: Bearer <token>`, else 401 with a body
that echoes what was sent, to test that clients scrub it) and `fail_commits` (commit answers 500).
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

_REPO = r"(?P<repo>[^/]+/[^/]+)"
_API_REPO = re.compile(rf"^/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?$")
_API_TREE = re.compile(rf"^/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$")
_API_PREUPLOAD = re.compile(rf"^/api/models/{_REPO}/preupload/(?P<rev>[^/]+)$")
_API_COMMIT = re.compile(rf"^/api/models/{_REPO}/commit/(?P<rev>[^/]+)$")
_API_BRANCH = re.compile(rf"^/api/models/{_REPO}/branch/(?P<branch>[^/]+)$")
_RESOLVE = re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


def git_blob_sha(content: bytes) -> str:
    """The git object id of a blob: what the Hub reports as a regular file's `oid`/ETag."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit sha -> {path: content}

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class FakeHub:
    """The server's in-memory state plus its options; `url` is what to put in `HF_ENDPOINT`."""

    def __init__(self, token: str | None = None, fail_commits: bool = False) -> None:
        self.token = token
        self.fail_commits = fail_commits
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self.connections: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._counter = itertools.count()
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening and cut the open keep-alive connections too: a server that is down, not idle."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
        for connection in list(self.connections):
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def new_commit_sha(self) -> str:
        return hashlib.sha1(f"commit-{next(self._counter)}".encode()).hexdigest()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"  # keep-alive, as httpx expects

    def setup(self) -> None:
        super().setup()
        self.hub.connections.add(self.connection)

    def finish(self) -> None:
        super().finish()
        self.hub.connections.discard(self.connection)

    def log_message(self, *_: object) -> None:  # quiet test output
        pass

    # -- plumbing ---------------------------------------------------------------------------

    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: object, headers: dict[str, str] | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(
        self, status: int, message: str, code: str | None = None, head: bool = False, extra: dict | None = None
    ) -> None:
        headers = {"X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._json(status, {"error": message}, headers, head)

    def _authorized(self, head: bool = False) -> bool:
        if self.hub.token is None:
            return True
        sent = self.headers.get("Authorization", "")
        if sent == f"Bearer {self.hub.token}":
            return True
        # Echo what was sent, as a careless server might: the client must not leak it further.
        self._error(401, f"Invalid username or password (got Authorization {sent!r})", head=head)
        return False

    def _repo(self, repo_id: str, head: bool = False) -> Repo | None:
        repo = self.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "Repository not found", "RepoNotFound", head)
        return repo

    def _revision(self, repo: Repo, revision: str, head: bool = False) -> str | None:
        sha = repo.resolve(unquote(revision))
        if sha is None:
            self._error(404, f"Invalid rev id: {unquote(revision)}", "RevisionNotFound", head)
        return sha

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        path, query = unquote(url.path), parse_qs(url.query)
        self.hub.requests.append((method, path))
        body = self._body() if method == "POST" else b""
        head = method == "HEAD"
        if not self._authorized(head):
            return
        with self.hub._lock:
            if method == "POST" and path == "/api/repos/create":
                return self._create_repo(json.loads(body))
            if method == "POST" and path == "/api/validate-yaml":
                return self._validate_yaml(json.loads(body))
            if method == "POST" and (match := _API_PREUPLOAD.match(url.path)):
                return self._preupload(match["repo"], match["rev"], json.loads(body))
            if method == "POST" and (match := _API_COMMIT.match(url.path)):
                return self._commit(match["repo"], match["rev"], body, query.get("create_pr", ["0"])[0] == "1")
            if method == "POST" and (match := _API_BRANCH.match(url.path)):
                return self._create_branch(match["repo"], unquote(match["branch"]), json.loads(body or b"{}"))
            if method == "GET" and (match := _API_TREE.match(url.path)):
                return self._tree(match["repo"], match["rev"], unquote(match["path"] or ""), query)
            if method == "GET" and (match := _API_REPO.match(url.path)):
                return self._info(match["repo"], match["rev"] or "main")
            if method in ("GET", "HEAD") and (match := _RESOLVE.match(url.path)):
                return self._resolve(match["repo"], match["rev"], unquote(match["path"]), head)
        self._error(404, f"No route for {method} {path}", head=head)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    # -- endpoints --------------------------------------------------------------------------

    def _create_repo(self, payload: dict) -> None:
        if payload.get("type", "model") != "model":
            return self._error(400, "this test server only hosts model repos")
        namespace = payload.get("organization") or "user"
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        sha = self.hub.new_commit_sha()
        # A new Hub repo starts with one commit holding .gitattributes.
        repo = Repo(private=payload.get("visibility") == "private", branches={"main": sha})
        repo.commits[sha] = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        self.hub.repos[repo_id] = repo
        self._json(200, {"url": url, "name": repo_id})

    def _validate_yaml(self, payload: dict) -> None:
        # The Hub parses the README's front matter; reject what it would reject at our level of detail.
        content = payload.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.DOTALL)
        errors = []
        if match is None:
            errors.append({"message": "README.md has no YAML metadata block"})
        else:
            try:
                metadata = yaml.safe_load(match.group(1))
            except yaml.YAMLError as error:
                metadata, errors = None, [{"message": f"invalid YAML: {error}"}]
            if not errors and not isinstance(metadata, dict):
                errors.append({"message": "metadata must be a mapping"})
        if errors:
            return self._json(400, {"errors": errors, "warnings": []})
        self._json(200, {"errors": [], "warnings": []})

    def _preupload(self, repo_id: str, revision: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None or (sha := self._revision(repo, revision)) is None:
            return
        files = repo.commits[sha]
        answer = [
            {
                "path": item["path"],
                "uploadMode": "regular",  # never LFS/Xet: the content comes inline in the commit
                "shouldIgnore": False,
                "oid": git_blob_sha(files[item["path"]]) if item["path"] in files else None,
            }
            for item in payload["files"]
        ]
        self._json(200, {"files": answer, "commitOid": sha})

    def _commit(self, repo_id: str, revision: str, body: bytes, create_pr: bool = False) -> None:
        if self.hub.fail_commits:
            return self._error(500, "Internal Error - We're working hard to fix this as soon as possible!")
        repo = self._repo(repo_id)
        if repo is None or (parent := self._revision(repo, revision)) is None:
            return
        branch = unquote(revision)
        if branch not in repo.branches:
            return self._error(400, f"Cannot commit to {branch}: not a branch")
        files = dict(repo.commits[parent])
        for line in body.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                if value.get("parentCommit") not in (None, parent):
                    return self._error(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "deletedFile":
                if value["path"] not in files:
                    return self._error(404, "A file with this name doesn't exist", "EntryNotFound")
                del files[value["path"]]
            elif key == "deletedFolder":
                prefix = value["path"].rstrip("/") + "/"
                files = {path: data for path, data in files.items() if not path.startswith(prefix)}
            else:
                return self._error(400, f"this test server does not support {key!r} operations")
        sha = self.hub.new_commit_sha()
        repo.commits[sha] = files
        pull_request = None
        if create_pr:  # the commit opens a pull request (refs/pr/N); the branch itself is not moved
            number = 1 + sum(name.startswith("refs/pr/") for name in repo.branches)
            repo.branches[f"refs/pr/{number}"] = sha
            pull_request = f"{self.hub.url}/{repo_id}/discussions/{number}"
        else:
            repo.branches[branch] = sha
        self._json(
            200,
            {"commitUrl": f"{self.hub.url}/{repo_id}/commit/{sha}", "commitOid": sha, "pullRequestUrl": pull_request},
        )

    def _create_branch(self, repo_id: str, branch: str, payload: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None or (sha := self._revision(repo, payload.get("startingPoint") or "main")) is None:
            return
        if branch in repo.branches:
            return self._error(409, f"Reference already exists: refs/heads/{branch}")
        repo.branches[branch] = sha
        self._json(200, {})

    def _info(self, repo_id: str, revision: str) -> None:
        repo = self._repo(repo_id)
        if repo is None or (sha := self._revision(repo, revision)) is None:
            return
        siblings = [{"rfilename": path} for path in sorted(repo.commits[sha])]
        self._json(
            200,
            {"id": repo_id, "modelId": repo_id, "sha": sha, "private": repo.private, "siblings": siblings, "tags": []},
        )

    def _tree(self, repo_id: str, revision: str, folder: str, query: dict) -> None:
        repo = self._repo(repo_id)
        if repo is None or (sha := self._revision(repo, revision)) is None:
            return
        recursive = query.get("recursive", ["False"])[0].lower() == "true"
        prefix = folder.rstrip("/") + "/" if folder else ""
        entries, folders = [], set()
        for path, content in sorted(repo.commits[sha].items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix) :]
            if not recursive and "/" in rest:
                folders.add(prefix + rest.split("/")[0])
                continue
            entries.append({"type": "file", "oid": git_blob_sha(content), "size": len(content), "path": path})
        entries += [{"type": "directory", "oid": "0" * 40, "size": 0, "path": path} for path in sorted(folders)]
        self._json(200, entries)

    def _resolve(self, repo_id: str, revision: str, path: str, head: bool) -> None:
        repo = self._repo(repo_id, head)
        if repo is None or (sha := self._revision(repo, revision, head)) is None:
            return
        files = repo.commits[sha]
        if path not in files:
            return self._error(404, "Entry not found", "EntryNotFound", head, {"X-Repo-Commit": sha})
        content = files[path]
        headers = {
            "X-Repo-Commit": sha,
            "ETag": f'"{git_blob_sha(content)}"',
            "Content-Type": "application/octet-stream",
        }
        self._send(200, content, headers, head)
