"""Remote sandbox: run a program on a SandboxFusion server (`sandbox.url`).

SandboxFusion (github.com/bytedance/SandboxFusion) is the HTTP code sandbox verl users deploy;
clusters whose nodes allow neither root nor user namespaces run one and point the code reward at
it. One run is one `POST {url}/run_code` with {"code", "language": "python", "stdin",
"run_timeout", "memory_limit_MB", ...}; the reply is {"status": "Success" | "Failed" |
"SandboxError", "message", "run_result": {"status": "Finished" | "TimeLimitExceeded" | "Error",
"return_code", "stdout", "stderr", "execution_time"}, ...}.

Only wall_time_s (run_timeout), memory_mb (memory_limit_MB) and output_limit_bytes (applied
here) reach a remote run; the other limits and the isolation are the server's configuration.

An unreachable or failing server raises SandboxUnavailable naming the URL (after retries): an
outage must stop the run, not score every code response 0.
"""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request

from mopd_megatron.rewards.sandbox_types import SandboxConfig, SandboxResult, SandboxUnavailable

_HTTP_SLACK_S = 30.0  # queueing + interpreter start on the server, beyond the run's own limit
_RETRIES = 3
_RETRY_STATUS = (502, 503, 504)  # a gateway or a busy server: worth another try


def run_code_url(url: str) -> str:
    """The /run_code endpoint of `url` (a server's base URL, or already its /run_code URL as
    verl's configs give it)."""
    url = url.rstrip("/")
    return url if url.endswith("/run_code") else url + "/run_code"


def run_remote(source: str, stdin: bytes, config: SandboxConfig) -> SandboxResult:
    """Run `source` on the server at config.url; raises SandboxUnavailable if it cannot."""
    payload = {"code": source, "language": "python",
               "stdin": stdin.decode("utf-8", errors="replace"),
               "run_timeout": config.wall_time_s, "compile_timeout": config.wall_time_s,
               "memory_limit_MB": config.memory_mb, "files": {}, "fetch_files": []}
    t0 = time.monotonic()
    reply = _post(run_code_url(config.url), payload, config.wall_time_s + _HTTP_SLACK_S)
    wall = time.monotonic() - t0
    run = reply.get("run_result") or {}
    out = (run.get("stdout") or "").encode("utf-8", errors="replace")
    err = (run.get("stderr") or "").encode("utf-8", errors="replace")
    result = lambda status, detail="", code=None, sig=None: SandboxResult(  # noqa: E731
        status=status, exit_code=code, signal=sig, stdout=out[:config.output_limit_bytes],
        stderr=err[:config.output_limit_bytes], wall_s=wall, detail=detail)
    status, run_status = reply.get("status"), run.get("status")
    if status == "SandboxError" or run_status == "Error":
        return result("error", "remote sandbox error: "
                      + str(reply.get("message") or run.get("stderr") or "no message")[-300:])
    if run_status == "TimeLimitExceeded":
        return result("timeout", "wall-time limit exceeded (remote)")
    if status not in ("Success", "Failed") or run_status != "Finished":
        return result("error", f"remote sandbox: unexpected reply status={status!r} "
                               f"run_result.status={run_status!r}")
    if max(len(out), len(err)) > config.output_limit_bytes:
        return result("output_limit", f"output limit exceeded ({config.output_limit_bytes} bytes)")
    code = run.get("return_code")
    if isinstance(code, int) and code < 0:  # the server's runner reports a signal as -signum
        return result("ok", sig=-code)
    return result("ok", code=code)


def _post(url: str, payload: dict, timeout: float) -> dict:
    body = json.dumps(payload).encode()
    why = ""
    for attempt in range(_RETRIES):
        if attempt:
            time.sleep(attempt)  # 1 s, then 2 s
        request = urllib.request.Request(url, data=body, method="POST", headers={
            "Content-Type": "application/json", "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                reply = json.loads(response.read())
            if not isinstance(reply, dict):
                raise ValueError(f"expected a JSON object, got {type(reply).__name__}")
            return reply
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code} {exc.reason}: {exc.read()[:300].decode(errors='replace')}"
            if exc.code not in _RETRY_STATUS:
                break  # the server understood and refused: another try would get the same
        except (urllib.error.URLError, socket.timeout, ConnectionError) as exc:
            why = f"{type(exc).__name__}: {getattr(exc, 'reason', exc)}"
        except ValueError as exc:  # not JSON, or not an object: not a SandboxFusion server
            why = f"the reply is not a SandboxFusion result ({exc})"
            break
    raise SandboxUnavailable(f"sandbox.url={url!r}: {why}")
