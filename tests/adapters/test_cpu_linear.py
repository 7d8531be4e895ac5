"""The CPU linear layers on prepacked oneDNN weights (``_cpu_linear``): the same products as
``F.linear`` at every call size (packed up to ``SMALL`` positions, plain above), and a packed row's
result independent of the rows beside it (what keeps a batched float32 row equal to its solo run)."""

from __future__ import annotations

import pytest

pytest.importorskip("batcher.adapters.hf")  # before torch: it sets the OpenMP wait policy
torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from batcher.adapters.hf._cpu_linear import SMALL, PackedLinear, pack_linears  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


def _layer(bias: bool) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(96, 160, bias=bias)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positions", [1, 2, 3, SMALL, SMALL + 1, 3 * SMALL + 7])
def test_packed_product_equals_f_linear_at_every_size(bias: bool, positions: int) -> None:
    linear = _layer(bias)
    packed = PackedLinear(linear)
    x = torch.randn(1, positions, 96)
    with torch.no_grad():
        got, want = packed(x), F.linear(x, linear.weight, linear.bias)
    assert got.shape == want.shape == (1, positions, 160)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_rows_result_does_not_depend_on_its_companions() -> None:
    packed = PackedLinear(_layer(False))
    x = torch.randn(SMALL, 96)
    with torch.no_grad():
        together = packed(x)
        alone = torch.cat([packed(x[i : i + 1]) for i in range(len(x))])
        in_threes = torch.cat([packed(x[i : i + 3]) for i in range(0, len(x), 3)])
    assert torch.equal(together, alone)
    assert torch.equal(together, in_threes)


def test_pack_linears_replaces_every_linear_and_keeps_the_models_output() -> None:
    model = torch.nn.Sequential(_layer(True), torch.nn.ReLU(), torch.nn.Linear(160, 8))
    x = torch.randn(5, 96)
    with torch.no_grad():
        before = model(x)
        assert pack_linears(model) == 2
        after = model(x)
    assert all(type(m) is not torch.nn.Linear for m in model.modules())
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


class _Attention(torch.nn.Module):
    """The projections of a Llama attention block: three products of one input."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.q_proj = torch.nn.Linear(96, 96, bias=bias)
        self.k_proj = torch.nn.Linear(96, 32, bias=bias)
        self.v_proj = torch.nn.Linear(96, 32, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("positions", [1, 3, SMALL, SMALL + 5])
def test_fused_siblings_give_exactly_their_separate_products(bias: bool, positions: int) -> None:
    block = _Attention(bias)
    alone = [PackedLinear(m) for m in (block.q_proj, block.k_proj, block.v_proj)]
    x = torch.randn(1, positions, 96)
    with torch.no_grad():
        want = [m(x) for m in alone]
        assert pack_linears(block) == 3
        assert isinstance(block.q_proj, PackedLinear) and block.q_proj.fused is not None
        assert block.q_proj.fused is block.v_proj.fused and block.q_proj.packed is None  # no own copy
        got = block(x)
    for g, w in zip(got, want, strict=True):
        assert torch.equal(g, w)
    assert block.q_proj.fused.on and block.q_proj.fused.output is None  # let go after the last


def test_siblings_called_otherwise_compute_alone_and_stay_right() -> None:
    block = _Attention(bias=True)
    reference = [PackedLinear(m) for m in (block.q_proj, block.k_proj, block.v_proj)]
    pack_linears(block)
    x, y = torch.randn(1, 4, 96), torch.randn(1, 4, 96)
    with torch.no_grad():
        k = block.k_proj(y)  # not after the leader, another input
        q, v = block.q_proj(x), block.v_proj(x)
        assert torch.equal(k, reference[1](y))
        assert torch.equal(q, reference[0](x)) and torch.equal(v, reference[2](x))
        assert isinstance(block.q_proj, PackedLinear) and block.q_proj.fused is not None
        assert not block.q_proj.fused.on  # the group stopped fusing: it would compute for nothing
