"""The remote sandbox (sandbox.url): the SandboxFusion client against a real HTTP server.

The server here is a small stand-in for SandboxFusion: it speaks its /run_code protocol (request
and reply fields as in SandboxFusion's sandbox/server/sandbox_api.py) and executes each program
through this project's local sandbox, isolated where this machine allows it. The client code
under test is the one the trainer uses; only the server side is a stand-in.
"""
import json
import os
import threading
from http.server import ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from http_helpers import JSONHandler
from mopd_megatron.config import ConfigError
from mopd_megatron.rewards import remote
from mopd_megatron.rewards import sandbox as sb
from mopd_megatron.rewards.code_verifier import CodeVerifier
from mopd_megatron.rewards.sandbox import SandboxConfig, SandboxUnavailable, run_program
from mopd_megatron.trainer.builders import _verifiers


def _local_config() -> dict:
    """How the stand-in server runs programs: isolated if possible; else (tests' own programs
    only) unisolated, as root with an interpreter the dropped uid can execute."""
    if sb.probe_isolation(SandboxConfig()).error is None:
        return {}
    if os.geteuid() == 0:
        if not os.path.exists("/usr/bin/python3"):
            pytest.skip("no isolation here, and as root the unisolated run needs /usr/bin/python3")
        return {"allow_unisolated": True, "python": "/usr/bin/python3"}
    return {"allow_unisolated": True}


class FusionStandIn(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, local: dict):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.local = local
        self.requests: list[dict] = []
        self.fail_next: list[int] = []  # HTTP statuses to answer with before serving normally
        self.reply_override = None  # a fixed reply body (dict), for the error paths

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(JSONHandler):
    def do_POST(self):
        server: FusionStandIn = self.server
        if self.path != "/run_code":
            return self._send(404, {"detail": "Not Found"})
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        server.requests.append(request)
        if server.fail_next:
            return self._send(server.fail_next.pop(0), {"detail": "try again"})
        if "code" not in request or request.get("language") != "python":
            return self._send(422, {"detail": "code and language=python are required"})
        if server.reply_override is not None:
            return self._send(200, server.reply_override)
        limits = dict(server.local, wall_time_s=float(request.get("run_timeout", 10)))
        if request.get("memory_limit_MB", -1) > 0:
            limits["memory_mb"] = request["memory_limit_MB"]
        res = run_program(request["code"], request.get("stdin") or "", SandboxConfig(**limits))
        self._send(200, _fusion_reply(res))


def _fusion_reply(res: sb.SandboxResult) -> dict:
    """A SandboxResult in SandboxFusion's reply format."""
    run = {"execution_time": res.wall_s, "stdout": res.stdout.decode(errors="replace"),
           "stderr": res.stderr.decode(errors="replace"), "return_code": None}
    if res.status == "timeout":
        return {"status": "Failed", "message": "", "compile_result": None, "files": {},
                "run_result": dict(run, status="TimeLimitExceeded")}
    if res.status in ("error", "output_limit"):
        return {"status": "SandboxError", "message": res.detail, "compile_result": None,
                "files": {}, "run_result": dict(run, status="Error")}
    code = -res.signal if res.signal is not None else res.exit_code
    return {"status": "Success" if code == 0 else "Failed", "message": "", "compile_result": None,
            "files": {}, "run_result": dict(run, status="Finished", return_code=code)}


@pytest.fixture(scope="module")
def server():
    srv = FusionStandIn(_local_config())
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def fresh(server, monkeypatch):
    """The server with its failure knobs reset, and a fresh isolation probe cache."""
    server.fail_next, server.reply_override = [], None
    monkeypatch.setattr(sb, "_probe_result", {})
    return server


ADD = "```python\na, b = map(int, input().split())\nprint(a + b)\n```"
ADD_TESTS = [{"stdin": "1 2\n", "stdout": "3\n"}, {"stdin": "-5 5", "stdout": "0"}]


def test_code_verifier_scores_through_the_server(fresh):
    v = CodeVerifier(sandbox={"url": fresh.url, "wall_time_s": 5, "memory_mb": 256})
    assert v.isolation.mode == "remote" and v.isolated
    assert fresh.url in v.describe_sandbox()
    assert v.score(ADD, {"tests": ADD_TESTS}).reward == 1.0
    wrong = v.score(ADD.replace("a + b", "a - b"), {"tests": ADD_TESTS})
    assert wrong.reward == 0.0 and "test 0: wrong answer" in wrong.reason
    func = "```python\ndef sq(x):\n    return x * x\n```"
    failed = v.score(func, {"tests": [{"assert": "assert sq(2) == 5"}]})
    assert failed.reward == 0.0 and "runtime error (exit 1) AssertionError" in failed.reason
    request = fresh.requests[-1]  # what reached the server: SandboxFusion's field names
    assert request["language"] == "python" and request["run_timeout"] == 5
    assert request["memory_limit_MB"] == 256 and request["code"].endswith("assert sq(2) == 5")


def test_timeout_signal_and_output_limit(fresh):
    cfg = SandboxConfig(url=fresh.url, wall_time_s=2, cpu_time_s=60, output_limit_bytes=1000)
    res = run_program("while True:\n    pass", b"", cfg)
    assert res.status == "timeout" and "wall-time" in res.detail
    res = run_program("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)", b"", cfg)
    assert res.status == "ok" and res.signal == 9 and not res.succeeded
    res = run_program("print('x' * 5000)", b"", cfg)  # the server returns it all; we cap it
    assert res.status == "output_limit" and len(res.stdout) == 1000
    res = run_program("import sys\nprint(sys.stdin.read()[::-1])", "olleh", cfg)
    assert res.succeeded and res.stdout == b"hello\n"


def test_run_code_url_accepts_verl_style_urls(fresh):
    assert remote.run_code_url("http://h:8080") == "http://h:8080/run_code"
    assert remote.run_code_url("http://h:8080/run_code/") == "http://h:8080/run_code"
    v = CodeVerifier(sandbox={"url": fresh.url + "/run_code"})
    assert v.score(ADD, {"tests": ADD_TESTS}).reward == 1.0


def test_busy_server_is_retried(fresh):
    fresh.fail_next = [503]
    res = run_program("print(7)", b"", SandboxConfig(url=fresh.url))
    assert res.succeeded and res.stdout == b"7\n"


def test_sandbox_error_reply_is_a_failed_run(fresh):
    cfg = SandboxConfig(url=fresh.url)
    assert sb.probe_isolation(cfg).mode == "remote"  # probed while the server was fine
    fresh.reply_override = {"status": "SandboxError", "message": "disk full", "run_result": None}
    res = run_program("print(1)", b"", cfg)
    assert res.status == "error" and "disk full" in res.detail


def test_unreachable_or_refusing_server_stops_the_run(fresh, monkeypatch):
    dead = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    dead_url = f"http://127.0.0.1:{dead.server_address[1]}"
    dead.server_close()  # nothing listens there now
    monkeypatch.setattr(remote, "_RETRIES", 1)
    with pytest.raises(SandboxUnavailable, match=f"sandbox.url='{dead_url}/run_code'"):
        CodeVerifier(sandbox={"url": dead_url})
    v = CodeVerifier(sandbox={"url": fresh.url})  # up at start-up, then refusing mid-run
    fresh.fail_next = [422]
    with pytest.raises(SandboxUnavailable, match="HTTP 422"):
        v.score(ADD, {"tests": ADD_TESTS})


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="SandboxConfig.url: 'ftp://h' is not an http"):
        SandboxConfig(url="ftp://h")
    with pytest.raises(ValueError, match="SandboxConfig.allow_unisolated: cannot be combined"):
        SandboxConfig(url="http://h:8080", allow_unisolated=True)
    with pytest.raises(ValueError, match="SandboxConfig.bwrap: '/nonexistent/bwrap'"):
        SandboxConfig(bwrap="/nonexistent/bwrap")


def _recipe(sandbox: dict):
    spec = SimpleNamespace(type="code", params={"sandbox": sandbox})
    return SimpleNamespace(reward=SimpleNamespace(verifiers={"code": spec}, workers=4))


def test_preflight_names_the_isolation_and_refuses_without_it(fresh, monkeypatch, capsys):
    registry = _verifiers(_recipe({"url": fresh.url}))
    registry.close()
    assert f"reward.verifiers.code: code sandbox remote: SandboxFusion server at {fresh.url}" \
        in capsys.readouterr().out
    monkeypatch.setattr(sb, "_probe", lambda config: sb.Isolation("none", error="pretend: none"))
    monkeypatch.setattr(sb, "_probe_result", {})  # the server's own probe filled the cache
    with pytest.raises(ConfigError) as err:
        _verifiers(_recipe({"wall_time_s": 3}))
    assert err.value.path == "reward.verifiers.code.params.sandbox"
    assert "pretend: none" in str(err.value) and "allow_unisolated" in str(err.value)
