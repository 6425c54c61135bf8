import os

# Two cores on CI: every process keeps to one intra-op thread so spawned ranks do not fight.
os.environ.setdefault("OMP_NUM_THREADS", "1")
