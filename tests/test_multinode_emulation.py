"""Two nodes emulated on one machine: two torchrun agents (--nnodes 2, 2 ranks each) run MOPD
steps of the tiny recipe with colocated SGLang engines, one real CPU server per emulated node.

Asserted from the run's own metrics and output, per step:
- each node's local rank 0 started its node's engine, at the place `mopd train --dry-run`
  prints for the same shape (the same function decides both);
- each engine was loaded by a rank of its own node only (global rank 0 loaded node 0's engine,
  never node 1's), over same-node shared memory;
- generation was driven over both engines from global rank 0;
- every engine's parity probe matched the trainer after every sync;
- engines released their memory after the rollout and resumed it before the sync;
- no server outlived the run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from dist_helpers import free_port
from launch_helpers import left_behind
from train_helpers import ROOT, recipe_overrides, tiny_inputs

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("sglang") is None,
                                 reason="needs the SGLang CPU harness (tests/harness/sglang_cpu/setup.sh)")]

NODES, PER_NODE, STEPS = 2, 2, 2
DEDICATED_STEPS = 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_inputs(tmp_path_factory.mktemp("emulation") / "tiny")


def _overrides(tiny: Path, run: Path, port: int, layout: list[str], steps: int = STEPS) -> list[str]:
    return recipe_overrides(tiny, run, steps=steps, extra=[
        "rollout.engine=sglang", "rollout.mode=colocated", f"model.checkpoint={tiny}/student/hf",
        "rollout.max_total_tokens=8192",
        "model.checkpoint_format=hf", f"rollout.base_port={port}", "rollout.startup_timeout_s=240",
        f"rollout.server_log_dir={run}/sglang", "rollout.parity_interval=1",
        "rollout.server_cpu_threads=1", "train.cpu_threads=1", "logging.console=true", *layout])


def _placement(text: str) -> list[str]:
    return re.findall(r"^placement (node .*)$", text, re.M)


def _emulate(tiny: Path, run: Path, layout: list[str], port: int | None = None,
             marker: str | None = None, steps: int = STEPS) -> tuple[str, list[dict], list[str]]:
    """Run both agents; (rank 0's output, metrics per step, the dry-run's placement lines)."""
    port = port or 20000 + free_port() % 20000  # engines take base_port .. base_port + 1
    sets = [a for o in _overrides(tiny, run, port, layout, steps) for a in ("--set", o)]
    marker = marker or uuid.uuid4().hex
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               MOPD_LAUNCHER_TEST_RUN=marker)
    dry = subprocess.run([sys.executable, "-m", "mopd_megatron.cli", "train", "--dry-run",
                          "--nodes", str(NODES), "--ranks-per-node", str(PER_NODE), *sets],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0, dry.stdout[-3000:] + dry.stderr[-3000:]
    from mopd_megatron.launch.emulate import run_nodes
    try:
        outs = run_nodes(NODES, PER_NODE, sets, run, env, ROOT)
    finally:
        left = left_behind(marker)
    assert not left, f"processes outlived the run: {left}"
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return outs[0], steps, _placement(dry.stdout)


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.pp=2"]], ids=["tp2xdp2", "pp2xdp2"])
def test_colocated_engines_on_two_emulated_nodes(tiny, tmp_path, layout):
    out, steps, planned = _emulate(tiny, tmp_path / "run", layout)
    # The run placed exactly what the dry-run printed: one engine per node, node 1's on its own
    # port, each next to its node's ranks.
    launched = _placement(out)
    assert launched == planned and len(launched) == NODES, (launched, planned)
    assert launched[0].startswith("node 0: ranks 0-1; engine 0 on port")
    assert launched[1].startswith("node 1: ranks 2-3; engine 0 on port")
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    for s in steps:
        # engine i is node i's (the fleet is gathered node by node): loaded by that node's
        # local rank 0 only, so global rank 0 loaded node 0's engine and not node 1's.
        assert s["sync/loader_rank/engine0"] == 0 and s["sync/loader_rank/engine1"] == 2, s
        assert s["sync/bytes/engine0"] == s["sync/bytes/engine1"] > 0
        assert s["sync/transport/shm"] == s["sync/bytes"]
        # generation spread over both engines (a prompt's 4 samples on one)
        assert s["rollout/samples/engine0"] > 0 and s["rollout/samples/engine1"] > 0
        assert s["rollout/samples/engine0"] % 4 == 0
        assert s["rollout/samples/engine0"] + s["rollout/samples/engine1"] == 16
        # every engine runs the weights the trainer just pushed (fp32: float noise)
        assert s["rollout/parity_mean_abs/engine0"] < 2e-3 and s["rollout/parity_mean_abs/engine1"] < 2e-3
        # fresh samples from synced engines: the ratio is 1 up to the same noise
        assert abs(s["rollout/train_minus_rollout_logp"]) < 0.01 and s["is/masked_frac"] == 0
        assert "time/release" in s and "time/resume" in s
    # The servers' own logs: each was released and resumed once per step.
    for n in range(NODES):
        log = (tmp_path / "run" / "sglang" / f"sglang_node{n}_0.log").read_text()
        assert log.count("/release_memory_occupation") == STEPS, n
        assert log.count("/resume_memory_occupation") == STEPS, n


def test_dedicated_engines_on_a_third_node_load_over_the_update_group(tiny, tmp_path):
    """Two servers started by the launcher's own engine-step command (slurm/launch.sh runs it
    once per task of an srun step on the engine nodes; here SLURM_LOCALID 0 and 1 on a third
    emulated node), handed to the trainer as dedicated engines: weights go over the gloo
    weight-update group that global rank 0 hosts, never through shared memory.

    Engine 1's server is killed once step 1 is logged: its task restarts it, the trainer waits
    for it, re-creates the update group with both servers and loads it again, and every step
    completes with both engines in parity."""
    import threading

    from launch_helpers import kill_when_logged, marked_processes
    from mopd_megatron.config import load_recipe
    from mopd_megatron.launch.emulate import start_engine_tasks, stop_engine_tasks
    from mopd_megatron.rollout.server import wait_healthy
    from train_helpers import RECIPE
    # The servers carry their own marker: they outlive the trainer by design (the launcher
    # stops its engine step), and must be gone once this test stops them.
    run, port, marker = tmp_path / "run", 20000 + free_port() % 20000, uuid.uuid4().hex
    cfg = load_recipe(RECIPE, _overrides(tiny, run, port, []))
    servers = []
    try:
        servers = start_engine_tasks(cfg, 2, run / "sglang",
                                     {"MOPD_LAUNCHER_TEST_RUN": marker, "PYTHONPATH": str(ROOT)})
        urls = [f"http://127.0.0.1:{port + i}" for i in range(2)]
        for url in urls:
            wait_healthy(url, 240)

        def engine1_server():
            return [pid for pid, cmd in marked_processes(marker).items()
                    if cmd.startswith(sys.executable) and "sglang.launch_server" in cmd
                    and f"--port {port + 1} " in cmd]
        killed = []
        killer = threading.Thread(daemon=True, target=lambda: killed.extend(
            kill_when_logged(run / "metrics.jsonl", engine1_server)))
        killer.start()
        out, steps, planned = _emulate(tiny, run, [
            "parallel.tp=2", "rollout.mode=dedicated", f"rollout.external_urls=[{','.join(urls)}]"],
            port=port, steps=DEDICATED_STEPS)
        killer.join(timeout=5)
    finally:
        stop_engine_tasks(servers)
        left = left_behind(marker, grace_s=10)
    assert not left, left
    assert killed, "engine 1's server was never found to kill"
    assert planned == [] and _placement(out) == []  # no colocated placement: nothing launched
    assert [s["step"] for s in steps] == list(range(1, DEDICATED_STEPS + 1))
    for s in steps:
        # rank 0 (rank 0 of the update group) broadcast every byte to both engines
        assert s["sync/loader_rank/engine0"] == 0 and s["sync/loader_rank/engine1"] == 0
        assert s["sync/transport/broadcast"] == s["sync/bytes"] > 0 and "sync/transport/shm" not in s
        assert s["rollout/parity_mean_abs/engine0"] < 2e-3 and s["rollout/parity_mean_abs/engine1"] < 2e-3
        assert s["rollout/samples/engine0"] > 0 and s["rollout/samples/engine1"] > 0
    logs = [(run / "sglang" / f"engine_node_{i}.log").read_text() for i in range(2)]
    for log in logs:
        assert log.count("/update_weights_from_distributed") >= DEDICATED_STEPS
        assert "/update_weights_from_tensor" not in log
    # restarted by its own task; the group re-created with the survivor too
    assert logs[1].count("Started server process") == 2 and "exited with" in logs[1]
    assert logs[0].count("Started server process") == 1
    assert logs[0].count("/init_weights_update_group") >= 2


def test_an_engine_killed_on_node_1_is_restarted_there_and_the_run_completes(tiny, tmp_path):
    """SIGKILL node 1's server once step 1 is logged: node 1's watchdog restarts it on its own
    node, the driver on node 0 waits for it and resubmits, the sync is pushed again if the
    restart overlapped it, and every step completes with every engine's parity in agreement."""
    import threading

    from launch_helpers import kill_when_logged, marked_processes
    run, port, marker, steps = tmp_path / "run", 20000 + free_port() % 20000, uuid.uuid4().hex, 4
    killed = []

    def node1_server():
        return [pid for pid, cmd in marked_processes(marker).items()
                if "sglang.launch_server" in cmd and f"--port {port + 1} " in cmd]
    killer = threading.Thread(daemon=True, target=lambda: killed.extend(
        kill_when_logged(run / "metrics.jsonl", node1_server)))
    killer.start()
    out, got, _ = _emulate(tiny, run, ["parallel.tp=2"], port=port, marker=marker, steps=steps)
    killer.join(timeout=5)
    assert killed, "node 1's server was never found to kill"
    assert [s["step"] for s in got] == list(range(1, steps + 1))
    for s in got:
        assert s["rollout/parity_mean_abs/engine0"] < 2e-3 and s["rollout/parity_mean_abs/engine1"] < 2e-3
        assert s["sync/loader_rank/engine1"] == 2  # still loaded by node 1 only
    assert got[-1]["rollout/samples/engine1"] > 0  # it generates again after the restart
    log = (run / "sglang" / "sglang_node1_0.log").read_text()
    assert log.count("Started server process") == 2, "node 1's server was not restarted there"
    assert (run / "sglang" / "sglang_node0_0.log").read_text().count("Started server process") == 1
