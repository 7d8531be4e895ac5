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

Projections of one layer that read the same input (``q_proj``/``k_proj``/``v_proj``,
``gate_proj``/``up_proj``) share one packed product (:class:`Fused`): the first computes all of
them, the others return their slice while they get the same input tensor. Each output column is
the same dot product either way (bitwise equal to the separate products, checked at packing);
one wider product is 3-11 % faster than three or two narrow ones at 1-32 positions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["MAX_PACKED_BYTES", "SMALL", "Fused", "PackedLinear", "pack_linears"]

MAX_PACKED_BYTES = 4 << 30
SMALL = 64  # calls of at most this many positions (all sequences together) take the packed path
_BATCH_HINT = 32  # the row count oneDNN chooses its weight layout for
#: Sibling projections fused into one product, by attribute name (the first one leads).
FUSED_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def _pack(weight: torch.Tensor) -> torch.Tensor:
    packed: torch.Tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), _BATCH_HINT)
    return packed


def _product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return out


class Fused:
    """One packed product for sibling projections: ``edges`` bound each one's output columns. The
    leader's call leaves its input and the whole output here for the others to slice. A sibling
    that gets another input (a model that calls them otherwise) computes alone, and the group
    stops fusing (``on``): the leader then computes only its own columns."""

    def __init__(self, linears: list[torch.nn.Linear]) -> None:
        with torch.no_grad():
            self.packed = _pack(torch.cat([m.weight for m in linears]))
            biases = [m.bias for m in linears]
            self.bias = None if biases[0] is None else torch.cat(biases)  # type: ignore[arg-type]
        self.edges = [0]
        for m in linears:
            self.edges.append(self.edges[-1] + m.out_features)
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.on = True


class PackedLinear(torch.nn.Module):
    """``nn.Linear`` whose product runs on oneDNN with a prepacked weight (its own, or its
    share of a :class:`Fused` group's)."""

    def __init__(self, linear: torch.nn.Linear, fused: Fused | None = None, index: int = 0) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.fused, self.index = fused, index
        self.packed = _pack(linear.weight) if fused is None else None  # a fused member's: if needed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # A bounded set of shapes for oneDNN: [1, T, features] with T <= SMALL (see ``_attention``).
        if x.numel() // self.in_features > SMALL:
            return F.linear(x, self.weight, self.bias)
        group, i = self.fused, self.index
        if group is not None and group.on:
            lo, hi = group.edges[i], group.edges[i + 1]
            if i == 0:
                group.input, group.output = x, _product(x, group.packed, group.bias)
                return group.output[..., lo:hi]
            if x is group.input and group.output is not None:
                out = group.output[..., lo:hi]
                if i == len(group.edges) - 2:  # the last sibling: let the step's tensors go
                    group.input = group.output = None
                return out
            group.on = False  # called otherwise than the leader's input: each computes alone
        if self.packed is None:
            self.packed = _pack(self.weight)
        return _product(x, self.packed, self.bias)


def pack_linears(model: Any) -> int:
    """Replace the model's ``nn.Linear`` layers by :class:`PackedLinear` (CPU only), sibling
    projections sharing a :class:`Fused` product; return how many were replaced (0 when not
    applicable)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    if params > MAX_PACKED_BYTES or next(model.parameters()).device.type != "cpu":
        return 0
    if not (torch.backends.mkldnn.is_available() and _self_check(model)):  # type: ignore[no-untyped-call]
        return 0
    count = 0
    with torch.no_grad():
        for parent in list(model.modules()):
            for names in FUSED_NAMES:
                siblings = [getattr(parent, name, None) for name in names]
                if _fusable(siblings):
                    group = Fused(siblings)  # type: ignore[arg-type]
                    for i, (name, child) in enumerate(zip(names, siblings, strict=True)):
                        setattr(parent, name, PackedLinear(child, group, i))  # type: ignore[arg-type]
                        count += 1
            for name, child in list(parent.named_children()):
                if type(child) is torch.nn.Linear:
                    setattr(parent, name, PackedLinear(child))
                    count += 1
    return count


def _fusable(siblings: list[Any]) -> bool:
    """Whether these are plain linears of one input width, all with a bias or none."""
    if not all(type(m) is torch.nn.Linear for m in siblings):
        return False
    return len({m.in_features for m in siblings}) == 1 and len({m.bias is None for m in siblings}) == 1


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
            pair = Fused([linear, linear])  # a fused product's slices are the separate products
            ok = ok and all(
                torch.equal(_product(x[:m], pair.packed, pair.bias)[:, : linear.out_features], packed(x[:m]))
                for m in (1, 3, _BATCH_HINT)
            )
    except (RuntimeError, AttributeError, NotImplementedError):
        return False
    return bool(ok)
