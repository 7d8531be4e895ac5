"""CPU speed-up: linear layers on oneDNN with weights packed once (what torch.compile's freezing
does for CPU, without compiling).

A CPU step is mostly ``aten::mm``; through oneDNN with prepacked (blocked) weights it is faster at
every row count measured, most of all at 2-3 rows, where MKL's plain product is slowest (decode
steps of 2-3 rows: 44-50 instead of 97-123 ms; figures: ``docs/hf-backend.md``). oneDNN builds and
caches one primitive per input shape, so only calls of at most ``SMALL`` positions take the packed
path (every size once did, and RSS crept ~50 MB per 1,000 requests); longer ones run ``F.linear``.
Numerics: float32 results differ from ``F.linear`` in the last bits (max ~1e-5 on unit-scale
outputs), as any two GEMM kernels do; a packed row's result does not depend on the rows beside it.

Packing keeps the original weight (used for long calls, and by anything that reads the module), so
linear weights take twice their memory; it is applied on CPU only, and only to models of at most
``MAX_PACKED_BYTES``. If this torch build lacks the oneDNN ops, or a self-check fails, the model is
left as it was.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MAX_PACKED_BYTES", "SMALL", "pack_linears"]

MAX_PACKED_BYTES = 4 << 30
SMALL = 64  # calls of at most this many positions (all sequences together) take the packed path
_BATCH_HINT = 32  # the row count oneDNN chooses its weight layout for


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` whose product runs on oneDNN with a prepacked weight."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), _BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A bounded set of shapes for oneDNN: [1, T, features] with T <= SMALL (see ``_attention``).
        if x.numel() // self.in_features <= SMALL:
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
