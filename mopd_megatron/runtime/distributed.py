"""torch.distributed start-up from torchrun or Slurm, NCCL on GPU and gloo on CPU."""
from __future__ import annotations

import datetime
import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"
    node_rank: int = 0          # which node (torchrun agent / Slurm node) this process is on
    local_world_size: int = 1   # processes on this node


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list such as ``gpu[003-005,010],cpu1``."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, timeout=10, check=True)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist)
    if not m:
        raise ValueError(f"cannot parse SLURM_JOB_NODELIST={nodelist!r}")
    prefix, ranges = m.group(1), m.group(2)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def launch_env(environ=None) -> LaunchEnv:
    """Read rank/world from torchrun (RANK, WORLD_SIZE, LOCAL_RANK) or Slurm (SLURM_PROCID, ...)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        # torchrun: GROUP_RANK is the agent's (node's) index, LOCAL_WORLD_SIZE its workers.
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)),
                         "torchrun", int(env.get("GROUP_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        addr = env.get("MASTER_ADDR") or _first_slurm_host(nodelist)
        # A port derived from the job id keeps concurrent jobs on shared nodes apart.
        port = int(env.get("MASTER_PORT") or 20000 + int(env.get("SLURM_JOB_ID", 0)) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm",
                         int(env.get("SLURM_NODEID", 0)), _slurm_tasks_on_this_node(env))
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"),
                     int(env.get("MASTER_PORT", 29500)), "single")


def _slurm_tasks_on_this_node(env) -> int:
    """Tasks of this step on this node: SLURM_TASKS_PER_NODE is "2(x3),1" (per node, in node
    order); SLURM_NTASKS_PER_NODE is only set when the job asked for a fixed number."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if spec:
        counts = []
        for part in spec.split(","):
            m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
            if m:
                counts += [int(m.group(1))] * int(m.group(2) or 1)
        node = int(env.get("SLURM_NODEID", 0))
        if node < len(counts):
            return counts[node]
    return int(env.get("SLURM_NTASKS_PER_NODE") or env.get("SLURM_NTASKS", 1))


def broadcast_object(obj, group=None, src: int = 0):
    """Collective: rank ``src``'s ``obj`` (any picklable object) on every rank of ``group``
    (None: the whole job; ``src`` is a global rank). Other ranks' ``obj`` is ignored."""
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def free_port(host: str = "") -> int:
    """A TCP port free on ``host`` now ("": every interface). Another process may take it
    before the caller binds it: bind soon after."""
    import socket
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The device this rank computes on."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def init_distributed(timeout_minutes: int = 30) -> LaunchEnv:
    """Initialise the default process group once (collective timeout ``timeout_minutes``,
    runtime.timeout_minutes); later calls return the same description and keep the first
    group's timeout."""
    le = launch_env()
    if dist.is_initialized():
        return le
    if torch.cuda.is_available():
        torch.cuda.set_device(le.local_rank % torch.cuda.device_count())
    os.environ.setdefault("MASTER_ADDR", le.master_addr)
    os.environ.setdefault("MASTER_PORT", str(le.master_port))
    dist.init_process_group(backend=backend(), rank=le.rank, world_size=le.world_size,
                            init_method=f"tcp://{le.master_addr}:{le.master_port}",
                            timeout=datetime.timedelta(minutes=timeout_minutes))
    return le
