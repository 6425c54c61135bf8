"""Stand-in for the trainer in the launcher test: one rank checks what Slurm and the launcher
gave it. It reads its place through mopd_megatron.runtime.distributed (as the trainer does),
joins the gloo group at MASTER_ADDR:MASTER_PORT, all-reduces its rank, and writes
<out_dir>/rank<r>.json. Exits non-zero on any mismatch.

    python tests/harness/slurm_local/rank_check.py OUT_DIR
"""
import argparse
import json
import os
import socket
import sys

import torch
import torch.distributed as dist

from mopd_megatron.runtime.distributed import init_distributed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out_dir")
    args = ap.parse_args()
    le = init_distributed(timeout_minutes=2)
    assert le.source == "slurm", f"launch_env read {le.source!r}, expected slurm variables"
    assert le.rank == int(os.environ["SLURM_PROCID"]) and le.world_size == int(os.environ["SLURM_NTASKS"])
    x = torch.tensor([float(le.rank)])
    dist.all_reduce(x)                                   # sum of ranks 0..n-1
    expected = le.world_size * (le.world_size - 1) / 2
    assert x.item() == expected, f"all_reduce gave {x.item()}, expected {expected}"
    dist.barrier()
    dist.destroy_process_group()
    os.makedirs(args.out_dir, exist_ok=True)
    rec = dict(rank=le.rank, world_size=le.world_size, local_rank=le.local_rank,
               master=f"{le.master_addr}:{le.master_port}", host=socket.gethostname(),
               all_reduce=x.item(), job=os.environ.get("SLURM_JOB_ID"),
               mopd_recipe=os.environ.get("MOPD_RECIPE"))
    with open(os.path.join(args.out_dir, f"rank{le.rank}.json"), "w") as fh:
        json.dump(rec, fh)
    print(f"rank {le.rank}/{le.world_size} ok: all_reduce={x.item()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
