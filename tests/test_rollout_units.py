"""Rollout pieces that need no SGLang server: launch commands, route probing, response parsing,
parity arithmetic, bucket serialisation. (The real-server tests are test_rollout_sglang.py.)"""
from __future__ import annotations

import os
import math
import threading
from http.server import ThreadingHTTPServer

import pytest
import torch

from http_helpers import JSONHandler
from mopd_megatron.rollout import ParityError, SamplingParams, ServerSpec, check_parity, parity_probe
from mopd_megatron.rollout.client import ServerClient, ServerError, ServerUnreachable, WeightUpdateAPI
from mopd_megatron.rollout.server import RouterSpec, SGLangRouter, server_environment
from mopd_megatron.rollout.sglang_engine import RolloutError, _parse_sample
from tests.dist_helpers import free_port


# -- launch commands -------------------------------------------------------------------------
def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_cpu_server_command_and_env():
    spec = ServerSpec(model_path="/m", port=31234, host="127.0.0.1", tp_size=2, device="cpu",
                      mem_fraction_static=0.3, colocated=True, extra_args=("--x", "1"))
    cmd = spec.command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    assert (_flag(cmd, "--host"), _flag(cmd, "--port"), _flag(cmd, "--tp-size")) == \
        ("127.0.0.1", "31234", "2")
    assert _flag(cmd, "--device") == "cpu" and _flag(cmd, "--attention-backend") == "torch_native"
    assert "--enable-memory-saver" not in cmd       # CPU has no memory saver
    assert "--sleep-on-idle" in cmd                 # an idle scheduler must not spin a core
    assert "--max-total-tokens" not in cmd          # SGLang sizes the cache unless told
    assert cmd[-2:] == ["--x", "1"]
    assert spec.environment()["SGLANG_USE_CPU_ENGINE"] == "1"
    assert spec.url == "http://127.0.0.1:31234"
    capped = ServerSpec(model_path="/m", port=1, device="cpu", max_total_tokens=4096, cpu_threads=3)
    assert _flag(capped.command(), "--max-total-tokens") == "4096"
    assert capped.environment()["OMP_NUM_THREADS"] == "3"   # conftest sets 1


def test_cpu_threads_apply_to_cpu_servers_only():
    assert ServerSpec(model_path="/m", port=1, device="cuda", cpu_threads=1).environment() == \
        server_environment(os.environ)


def test_cuda_server_command_memory_saver_only_when_colocated():
    colo = ServerSpec(model_path="/m", port=1, device="cuda", colocated=True).command()
    dedicated = ServerSpec(model_path="/m", port=1, device="cuda", colocated=False).command()
    assert "--enable-memory-saver" in colo and "--enable-memory-saver" not in dedicated
    assert "--device" not in colo and "--attention-backend" not in colo
    # nothing device-specific is added to the environment on CUDA
    assert ServerSpec(model_path="/m", port=1, device="cuda").environment() == \
        server_environment(os.environ)


# What torchrun 2.13 gives a worker (printed from a `--nproc-per-node 2` worker) and what srun
# gives a task of a 2-task step on the local Slurm (tests/harness/slurm_local).
TORCHRUN_WORKER = {
    "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
    "GROUP_RANK": "0", "GROUP_WORLD_SIZE": "1", "ROLE_RANK": "1", "ROLE_WORLD_SIZE": "2",
    "ROLE_NAME": "default", "MASTER_ADDR": "localhost", "MASTER_PORT": "38309",
    "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RUN_ID": "none",
    "TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0",
    "TORCHELASTIC_ERROR_FILE": "/tmp/torchelastic_x/none_y/attempt_0/1/error.json",
    "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGINT,SIGHUP,SIGQUIT",
}
SRUN_TASK = {
    "SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NODEID": "0", "SLURM_TASK_PID": "4242",
    "SLURM_GTIDS": "0,1", "SLURM_NTASKS": "2", "SLURM_NPROCS": "2", "SLURM_STEPID": "0",
    "SLURM_STEP_ID": "0", "SLURM_STEP_NODELIST": "n0", "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_TASKS_PER_NODE": "2", "SLURM_STEP_LAUNCHER_PORT": "40123",
    "SLURM_SRUN_COMM_HOST": "127.0.0.1", "SLURM_SRUN_COMM_PORT": "40124",
    "SLURM_LAUNCH_NODE_IPADDR": "127.0.0.1", "SLURM_DISTRIBUTION": "block",
    "SLURM_LABELIO": "1", "SLURM_PRIO_PROCESS": "0", "SLURM_CPU_BIND": "quiet,none",
    "SLURM_CPU_BIND_TYPE": "none", "SLURM_CPU_BIND_LIST": "", "PMI_RANK": "1", "PMIX_RANK": "1",
}
KEPT = {  # the user's and the job's settings
    "PATH": "/usr/bin", "HOME": "/root", "PYTHONPATH": "/repo", "OMP_NUM_THREADS": "1",
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "TORCH_DISTRIBUTED_DEBUG": "DETAIL",
    "CUDA_VISIBLE_DEVICES": "0,1", "NCCL_DEBUG": "INFO", "SGLANG_USE_CPU_ENGINE": "1",
    "SLURM_JOB_ID": "17", "SLURM_JOBID": "17", "SLURM_JOB_NODELIST": "n0", "SLURM_NODELIST": "n0",
    "SLURM_JOB_NUM_NODES": "1", "SLURM_NNODES": "1", "SLURM_CPUS_ON_NODE": "2",
    "SLURM_SUBMIT_DIR": "/repo", "SLURM_CLUSTER_NAME": "c", "SLURM_TASKS_PER_NODE": "2",
}


def test_server_environment_drops_the_launchers_rank_variables():
    """A server is not a rank of the trainer's job: torchrun's and srun's per-process variables
    go (TORCHELASTIC_USE_AGENT_STORE alone hangs SGLang's start-up), the rest stays as is."""
    env = server_environment({**TORCHRUN_WORKER, **SRUN_TASK, **KEPT})
    assert env == KEPT
    assert server_environment(KEPT) == KEPT and server_environment({}) == {}
    base = {**TORCHRUN_WORKER, **KEPT}
    server_environment(base)
    assert base == {**TORCHRUN_WORKER, **KEPT}           # the argument is not modified
    # The default is os.environ; what ServerSpec and the router launch with.
    saved = dict(os.environ)
    try:
        os.environ.update(TORCHRUN_WORKER, SLURM_PROCID="0", SLURM_STEP_ID="3")
        spec_env = ServerSpec(model_path="/m", port=1, device="cpu", cpu_threads=2).environment()
        assert not set(spec_env) & (set(TORCHRUN_WORKER) | {"SLURM_PROCID", "SLURM_STEP_ID"})
        assert spec_env["SGLANG_USE_CPU_ENGINE"] == "1" and spec_env["OMP_NUM_THREADS"] == "2"
        assert spec_env == {**server_environment(), "SGLANG_USE_CPU_ENGINE": "1",
                            "OMP_NUM_THREADS": "2"}
        router = SGLangRouter(RouterSpec(("http://127.0.0.1:1",), port=2))   # not started
        assert router.process.env == server_environment()
        assert "TORCHELASTIC_USE_AGENT_STORE" not in router.process.env
        # a spec's own env wins, even for a name the filter drops
        assert ServerSpec(model_path="/m", port=1, device="cpu",
                          env=(("MASTER_PORT", "1234"),)).environment()["MASTER_PORT"] == "1234"
    finally:
        os.environ.clear()
        os.environ.update(saved)


def test_server_specs_from_rollout_config():
    from mopd_megatron.config.systems import RolloutConfig
    from mopd_megatron.rollout.sglang_engine import server_specs_from_config
    cfg = RolloutConfig(mode="dedicated", num_engines=3, base_port=31000, host="127.0.0.2",
                        server_tp_size=2, mem_fraction_static=0.4, max_total_tokens=2048,
                        server_cpu_threads=3, server_args=["--disable-radix-cache",
                                                           "--attention-backend", "triton"])
    specs = server_specs_from_config(cfg, "/ckpt", log_dir="/logs", device="cuda")
    assert [s.url for s in specs] == [f"http://127.0.0.2:{31000 + i}" for i in range(3)]
    assert all(s.tp_size == 2 and s.mem_fraction_static == 0.4 and not s.colocated
               and s.max_total_tokens == 2048 and s.cpu_threads == 3 for s in specs)
    assert specs[2].log_path == "/logs/sglang_2.log"
    assert "--enable-memory-saver" not in specs[0].command()
    # recipe flags come last: argparse keeps the last value, so they win over device defaults
    assert specs[1].command()[-3:] == ["--disable-radix-cache", "--attention-backend", "triton"]
    colo = server_specs_from_config(RolloutConfig(mode="colocated"), "/ckpt", device="cuda")
    assert "--enable-memory-saver" in colo[0].command()
    with pytest.raises(ValueError, match="external"):
        server_specs_from_config(RolloutConfig(mode="external", external_urls=["http://h:1"]), "/c")
    from mopd_megatron.config import ConfigError
    with pytest.raises(ConfigError, match="rollout.server_args.*launches no servers"):
        RolloutConfig(mode="external", external_urls=["http://h:1"], server_args=["--x"])


def test_unknown_device_is_refused():
    with pytest.raises(ValueError, match="device='tpu'"):
        ServerSpec(model_path="/m", port=1, device="tpu").command()


def test_router_binds_only_configured_host():
    cmd = RouterSpec(("http://127.0.0.1:1", "http://127.0.0.1:2"), 4000, "127.0.0.1").command()
    assert _flag(cmd, "--host") == "127.0.0.1" and _flag(cmd, "--prometheus-host") == "127.0.0.1"
    assert _flag(cmd, "--prometheus-port") == "4001"
    i = cmd.index("--worker-urls")
    assert cmd[i + 1:i + 3] == ["http://127.0.0.1:1", "http://127.0.0.1:2"]


# -- route probing against a loopback stand-in server ----------------------------------------
class _Routes(JSONHandler):
    post_routes: set = set()
    openapi: bool = True

    def do_GET(self):
        if self.path == "/openapi.json" and self.openapi:
            return self._send(200, {"paths": {p: {} for p in self.post_routes}})
        self._send(405 if self.path in self.post_routes else 404, {"detail": "x"})

    def do_POST(self):
        if self.path == "/fail":
            return self._send(200, {"success": False, "message": "nope"})
        self._send(200 if self.path in self.post_routes else 404, {"success": True})


def _serve(routes, openapi):
    handler = type("H", (_Routes,), {"post_routes": set(routes), "openapi": openapi})
    srv = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.mark.parametrize("routes,openapi,expected", [
    ({"/begin_weight_update", "/end_weight_update", "/post_process_weights"}, True,
     WeightUpdateAPI.BEGIN_END),
    ({"/begin_weight_update", "/end_weight_update"}, False, WeightUpdateAPI.BEGIN_END),
    ({"/post_process_weights"}, True, WeightUpdateAPI.POST_PROCESS),
    ({"/post_process_weights"}, False, WeightUpdateAPI.POST_PROCESS),
    ({"/generate"}, True, WeightUpdateAPI.NONE),
])
def test_weight_update_api_probe(routes, openapi, expected):
    srv, url = _serve(routes, openapi)
    try:
        assert ServerClient(url, timeout_s=5).weight_update_api() == expected
    finally:
        srv.shutdown()


def test_client_error_kinds():
    srv, url = _serve({"/ok"}, True)
    try:
        c = ServerClient(url, timeout_s=5)
        assert c.post_ok("/ok") == {"success": True}
        with pytest.raises(ServerError, match="nope"):
            c.post_ok("/fail")                       # 200 with success=false is an error
        with pytest.raises(ServerError, match="HTTP 404"):
            c.post("/missing")
    finally:
        srv.shutdown()
    with pytest.raises(ServerUnreachable):
        ServerClient(f"http://127.0.0.1:{free_port()}", timeout_s=2).post("/generate", {})


def test_dead_external_server_is_reported_not_restarted():
    from mopd_megatron.rollout import SGLangEngine
    eng = SGLangEngine.connect([f"http://127.0.0.1:{free_port()}"], request_timeout_s=2,
                               health_timeout_s=2, max_retries=1)
    try:
        with pytest.raises(RolloutError, match="not launched by this job"):
            eng.generate([[1, 2]], 1, SamplingParams(max_new_tokens=2))
        assert eng.health() == {eng.clients[0].url: False}
    finally:
        eng.shutdown()


# -- response parsing ------------------------------------------------------------------------
def _answer(ids, lps, reason, version="v7"):
    return {"output_ids": ids, "meta_info": {
        "id": "r", "finish_reason": reason, "weight_version": version,
        "output_token_logprobs": [[lp, i, None] for lp, i in zip(lps, ids)]}}


def test_parse_sample():
    s = _parse_sample(_answer([4, 9], [-0.5, -1.25], {"type": "length", "length": 2}), 1, 3,
                      [1, 2], retries=2)
    assert (s.token_ids, s.logprobs, s.finish_reason, s.weight_version, s.retries) == \
        ([4, 9], [-0.5, -1.25], "length", "v7", 2)
    assert _parse_sample(_answer([1], [-0.1], {"type": "stop", "matched": 1}), 0, 0, [3],
                         0).finish_reason == "stop"
    bad = _answer([4, 9], [-0.5, -1.25], {"type": "length"})
    bad["meta_info"]["output_token_logprobs"][1][1] = 8
    with pytest.raises(RolloutError, match="do not match"):
        _parse_sample(bad, 0, 0, [1], 0)


def test_sampling_params_validation_and_wire_format():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    wire = SamplingParams(temperature=0.7, max_new_tokens=5, stop_token_ids=(1,)).to_sglang()
    assert wire["temperature"] == 0.7 and wire["max_new_tokens"] == 5
    assert wire["stop_token_ids"] == [1]


# -- parity arithmetic -----------------------------------------------------------------------
class _FixedScores:
    def __init__(self, scores):
        self.scores = scores

    def score(self, sequences):
        assert len(sequences) == len(self.scores)
        return self.scores


def test_parity_probe_mean_and_max():
    engine = _FixedScores([[-1.0, -2.0, -3.0], [-0.5]])
    trainer = [[-1.1, -2.0, -2.5], [-0.25]]
    diffs = [0.1, 0.0, 0.5, 0.25]
    r = parity_probe(engine, [[0] * 4, [0] * 2], trainer)
    assert r.tokens == 4
    assert math.isclose(r.mean_abs_diff, sum(diffs) / 4, rel_tol=1e-12)
    assert math.isclose(r.max_abs_diff, 0.5, rel_tol=1e-12)
    assert check_parity(engine, [[0] * 4, [0] * 2], trainer, tolerance=0.3).tokens == 4
    with pytest.raises(ParityError, match="parity_tolerance=0.1"):
        check_parity(engine, [[0] * 4, [0] * 2], trainer, tolerance=0.1)
    with pytest.raises(ParityError):   # NaN never passes
        check_parity(_FixedScores([[float("nan")]]), [[0, 0]], [[0.0]], tolerance=1.0)
    with pytest.raises(ValueError, match="sequence 0"):
        parity_probe(_FixedScores([[-1.0]]), [[0, 0, 0]], [[-1.0, -2.0]])


# -- bucket serialisation (needs the sglang package, not a server) --------------------------
def test_serialize_bucket_round_trip_mixed_dtypes():
    pytest.importorskip("sglang", reason="SGLang CPU harness not installed "
                        "(tests/harness/sglang_cpu/setup.sh)")
    from sglang.srt.utils import MultiprocessingSerializer
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    from mopd_megatron.rollout.weight_sync import serialize_bucket
    g = torch.Generator().manual_seed(0)
    bucket = [("a.weight", torch.randn(3, 5, generator=g)),
              ("b.bias", torch.randn(7, generator=g).to(torch.bfloat16)),
              ("c.weight", torch.randn(4, 2, generator=g).t())]   # non-contiguous
    blob, _shared = serialize_bucket(bucket)   # held: the blob only names its storage
    payload = MultiprocessingSerializer.deserialize(blob)
    got = FlattenedTensorBucket(flattened_tensor=payload["flattened_tensor"],
                                metadata=payload["metadata"]).reconstruct_tensors()
    got = dict(got)
    assert sorted(got) == sorted(n for n, _ in bucket)
    for name, want in bucket:
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape
        assert torch.equal(have, want)
    with pytest.raises(ValueError, match="empty bucket"):
        serialize_bucket([])
