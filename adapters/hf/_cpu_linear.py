"""CPU speed-up: linear layers on oneDNN with weights packed once (what torch.compile's freezing
does for CPU, without compiling).

A CPU decode step is mostly ``aten::mm``; through oneDNN with prepacked (blocked) weights it is
about a third faster at 32 rows (figures: ``docs/hf-backend.md``). With 1-3 rows the plain path
is as fast (memory-bound), so it is kept there, and for calls of more than 64 positions (see
``PackedLinear.forward``).
Numerics: float32 results differ from ``F.linear`` in the last bits (max ~1e-5 on unit-scale
outputs), as any two GEMM kernels do.

Packing keeps the original weight (used for few rows, and by anything that reads the module), so
linear weights take twice their memory; it is applied on CPU only, and only to models of at most
``MAX_PACKED_BYTES``. If this torch build lacks the oneDNN ops, or a self-check fails, the model is
left as it was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MAX_PACKED_BYTES", "pack_linears"]

MAX_PACKED_BYTES = 4 << 30
_FEW_ROWS = 4  # below this many rows the plain (memory-bound) path is as fast
_BATCH_HINT = 32  # the row count oneDNN chooses its weight layout for
_SMALL = 64  # calls of at most this many positions (all sequences together) take the packed path


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` whose product runs on oneDNN with a prepacked weight."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # oneDNN caches one primitive per input shape, so the packed path takes a bounded set of
        # shapes: packed calls of at most _SMALL positions ([1, T, features], see
        # ``_attention``). Call sizes vary without end (RSS crept up ~50 MB per 1,000 requests
        # when every prefill used this path).
        rows = x.numel() // self.in_features
        if _FEW_ROWS <= rows <= _SMALL:
            out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
            return out
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: Any) -> int:
    """Replace the model's ``nn.Linear`` layers by :class:`PackedLinear` (CPU only); return how
    many were replaced (0 when not applicable)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if params > MAX_PACKED_BYTES or next(model.parameters()).device.type != "cpu":
        return 0
    if not (torch.backends.mkldnn.is_available() and _self_check(model)):  # type: ignore[no-untyped-call]
        return 0
    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, PackedLinear(child))
                    count += 1
    return count


def _self_check(model: Any) -> bool:
    """Whether the packed path works here and agrees with ``F.linear`` on one layer."""
    linear = next((m for m in model.modules() if type(m) is torch.nn.Linear), None)
    if linear is None:
        return False
    try:
        with torch.no_grad():
            packed = PackedLinear(linear)
            x = torch.randn(_BATCH_HINT, linear.in_features, dtype=linear.weight.dtype)
            ok = torch.allclose(
                packed(x).float(), F.linear(x, linear.weight, linear.bias).float(), rtol=2e-2, atol=2e-2
            )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(ok)
