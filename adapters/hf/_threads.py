"""The OpenMP wait policy the HF backend ships: a bounded spin, set before torch loads.

torch's CPU kernels run on libgomp, whose idle threads spin before they sleep. Spinning makes a
step faster on an idle machine; on a machine shared with busy processes, spinning threads take the
CPU from the thread that holds the work and a step can take many times longer (a user's stream
missed its 10 s deadline that way). libgomp reads its settings once, when torch loads, so this
module sets ``GOMP_SPINCOUNT`` then, unless the user chose a policy (``OMP_WAIT_POLICY`` or
``GOMP_SPINCOUNT`` set) or torch is already loaded. ``benchmarks/bench_omp.py`` measures the
options on an idle and a busy machine; the figures and the choice are in ``docs/hf-backend.md``.
"""

from __future__ import annotations

import logging
import os
import sys

__all__ = ["SPIN_COUNT", "apply_default_wait_policy"]

SPIN_COUNT = "10000"
_log = logging.getLogger("batcher.adapters.hf")


def apply_default_wait_policy() -> str | None:
    """Set the bounded spin if nothing else decided; return what now applies (``None``: torch's
    own default, because torch was imported before the backend)."""
    env = os.environ
    if "OMP_WAIT_POLICY" in env or "GOMP_SPINCOUNT" in env:
        return f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY')} GOMP_SPINCOUNT={env.get('GOMP_SPINCOUNT')}"
    if "torch" in sys.modules:
        _log.info(
            "torch was imported before batcher.adapters.hf: OpenMP keeps its default wait policy, "
            "which can stall steps many times over on a busy machine; import batcher.adapters.hf "
            "first, or set GOMP_SPINCOUNT=%s before starting Python",
            SPIN_COUNT,
        )
        return None
    env["GOMP_SPINCOUNT"] = SPIN_COUNT
    return f"GOMP_SPINCOUNT={SPIN_COUNT}"
