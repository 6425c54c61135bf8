"""Domain-weighted, deterministic, resumable prompt sampling.

Draw k first picks a domain with probability proportional to its weight, from a generator
seeded by (seed, k) alone; then takes the next prompt of that domain's current epoch, a
permutation seeded by (seed, domain, epoch). Nothing depends on hidden generator state, so the
position is a handful of counters: a resumed run that loads ``state_dict()`` draws exactly the
prompts the uninterrupted run would have drawn.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np

from .dataset import PromptDataset
from .rows import DataError, PromptRow

__all__ = ["DomainSampler"]

_STATE_VERSION = 1


class DomainSampler:
    def __init__(self, dataset: PromptDataset, weights: dict[str, float], seed: int):
        missing = [d for d in weights if d not in dataset.rows_by_domain]
        if missing:
            raise DataError(f"data.domain_weights: domains {missing} are not in the dataset")
        self.dataset, self.seed = dataset, int(seed)
        self.domains = list(weights)
        w = np.asarray([weights[d] for d in self.domains], dtype=np.float64)
        self._cdf = np.cumsum(w / w.sum())  # [n_domains]
        self._cdf[-1] = 1.0                  # no draw may fall past the end through rounding
        self.draws = 0
        self._cursor = {d: [0, 0] for d in self.domains}   # domain -> [epoch, position]
        self._perm: dict[str, tuple[int, np.ndarray]] = {}  # domain -> (epoch, permutation)

    # --- drawing ------------------------------------------------------------------------------
    def _domain_at(self, k: int) -> str:
        u = np.random.default_rng([self.seed, k]).random()
        return self.domains[int(np.searchsorted(self._cdf, u, side="right"))]

    def _permutation(self, domain: str, epoch: int) -> np.ndarray:
        cached = self._perm.get(domain)
        if cached is None or cached[0] != epoch:
            # crc32, not hash(): Python's string hash changes between processes.
            rng = np.random.default_rng([self.seed, zlib.crc32(domain.encode()), epoch])
            cached = (epoch, rng.permutation(len(self.dataset.rows_by_domain[domain])))
            self._perm[domain] = cached
        return cached[1]

    def next(self) -> PromptRow:
        domain = self._domain_at(self.draws)
        epoch, pos = self._cursor[domain]
        rows = self.dataset.rows_by_domain[domain]
        row = rows[int(self._permutation(domain, epoch)[pos])]
        pos += 1
        if pos == len(rows):
            epoch, pos = epoch + 1, 0
        self._cursor[domain] = [epoch, pos]
        self.draws += 1
        return row

    def next_batch(self, n: int) -> list[PromptRow]:
        """The next ``n`` prompts (the rollout batch of one step)."""
        return [self.next() for _ in range(n)]

    # --- resume -------------------------------------------------------------------------------
    def _fingerprint(self) -> dict[str, int]:
        return {d: len(self.dataset.rows_by_domain[d]) for d in self.domains}

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON-able position (goes into the checkpoint)."""
        return {"version": _STATE_VERSION, "seed": self.seed, "draws": self.draws,
                "cursor": {d: list(c) for d, c in self._cursor.items()},
                "weights_cdf": self._cdf.tolist(), "rows_per_domain": self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; refuses a state from different data, weights or seed, since
        the resumed prompts would then silently differ from the uninterrupted run's."""
        if state.get("version") != _STATE_VERSION:
            raise DataError(f"sampler state version {state.get('version')!r} is not {_STATE_VERSION}")
        checks = [("seed", self.seed, state["seed"], "data.seed"),
                  ("rows_per_domain", self._fingerprint(), state["rows_per_domain"], "data.paths"),
                  ("domains", self.domains, list(state["cursor"]), "data.domain_weights")]
        for name, now, saved, field in checks:
            if now != saved:
                raise DataError(f"{field}: the checkpoint's sampler was built with {name}={saved!r}, "
                                f"this run has {now!r}; resuming would draw different prompts")
        if not np.allclose(self._cdf, state["weights_cdf"], rtol=0, atol=1e-12):
            raise DataError("data.domain_weights: changed since the checkpoint; resuming would draw "
                            "different prompts")
        self.draws = int(state["draws"])
        self._cursor = {d: [int(e), int(p)] for d, (e, p) in state["cursor"].items()}
