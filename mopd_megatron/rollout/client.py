"""A thin JSON-over-HTTP client for one SGLang server (or router) URL.

Errors are split by what the caller can do about them: ServerUnreachable (connection refused,
reset, timed out: the server may be dead, so check health and maybe restart) versus
ServerError (the server answered with an error: a bug or bad input, never retried blindly).
"""
from __future__ import annotations

import threading

import requests

__all__ = ["ServerClient", "ServerError", "ServerUnreachable", "WeightUpdateAPI"]


class ServerUnreachable(ConnectionError):
    def __init__(self, url: str, path: str, cause: BaseException):
        super().__init__(f"{url}{path}: no answer ({type(cause).__name__}: {cause})")
        self.url, self.path = url, path


class ServerError(RuntimeError):
    def __init__(self, url: str, path: str, status: int, body: str):
        super().__init__(f"{url}{path}: HTTP {status}: {body[:500]}")
        self.url, self.path, self.status, self.body = url, path, status, body


class WeightUpdateAPI:
    """How a server brackets tensor/distributed weight updates (differs across releases)."""

    BEGIN_END = "begin_end"          # SGLang >= 0.5.23: /begin_weight_update .. /end_weight_update
    POST_PROCESS = "post_process"    # older: /post_process_weights after loading
    NONE = "none"                    # neither route: plain updates


class ServerClient:
    """Calls to one base URL; one requests.Session per thread (Session is not thread-safe)."""

    def __init__(self, url: str, timeout_s: float = 600.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s
        self._local = threading.local()
        self._routes: set[str] | None = None

    def _session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def request(self, method: str, path: str, body: dict | None = None,
                timeout_s: float | None = None) -> dict | list | str:
        timeout = timeout_s if timeout_s is not None else self.timeout_s
        try:
            resp = self._session().request(method, self.url + path, json=body, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ServerUnreachable(self.url, path, exc) from exc
        if resp.status_code >= 400:
            raise ServerError(self.url, path, resp.status_code, resp.text)
        try:
            return resp.json()
        except ValueError:
            return resp.text

    def post(self, path: str, body: dict | None = None, timeout_s: float | None = None):
        return self.request("POST", path, body if body is not None else {}, timeout_s)

    def get(self, path: str, timeout_s: float | None = None):
        return self.request("GET", path, None, timeout_s)

    def post_ok(self, path: str, body: dict | None = None, timeout_s: float | None = None):
        """POST to a control route that answers {"success": bool, "message": str}."""
        out = self.post(path, body, timeout_s)
        if isinstance(out, dict) and out.get("success") is False:
            raise ServerError(self.url, path, 200, str(out.get("message")))
        return out

    def healthy(self, timeout_s: float = 30.0, path: str = "/health_generate") -> bool:
        """True when the server answers path with 200. /health_generate runs a real one-token
        generation, so a wedged scheduler fails it even while the HTTP front end is up."""
        try:
            return self._session().get(self.url + path, timeout=timeout_s).status_code == 200
        except requests.RequestException:
            return False

    # -- capability probing ---------------------------------------------------------------
    def routes(self) -> set[str]:
        """The server's HTTP routes, from its OpenAPI schema (probed once, then cached)."""
        if self._routes is None:
            schema = self.get("/openapi.json", timeout_s=30)
            self._routes = set(schema.get("paths", {})) if isinstance(schema, dict) else set()
        return self._routes

    def has_route(self, path: str) -> bool:
        try:
            return path in self.routes()
        except ServerError:
            # No schema (docs disabled): a POST-only route answers GET with 405, a missing one 404.
            status = self._session().get(self.url + path, timeout=30).status_code
            return status == 405

    def weight_update_api(self) -> str:
        if self.has_route("/begin_weight_update"):
            return WeightUpdateAPI.BEGIN_END
        if self.has_route("/post_process_weights"):
            return WeightUpdateAPI.POST_PROCESS
        return WeightUpdateAPI.NONE
