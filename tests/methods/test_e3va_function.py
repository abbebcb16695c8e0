"""The fused adapter function alone, outside any trunk: its backward is the true gradient."""
import pytest
import torch
from torch import nn

from e3va.methods.e3va import _LowRankAdapterFunction
from e3va.side_memory import CompactInput


@pytest.mark.parametrize("train_v_down", [True, False])
def test_gradcheck_of_the_fused_adapter_function_in_float64_with_fp32_storage(train_v_down):
    gen = torch.Generator().manual_seed(0)
    dim, bottleneck, branches_x_rank = 6, 4, 4  # U: out x 2r, V: 2r x in, as DualLowRankLinear.factors()

    def param(*shape, grad=True):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_(grad)

    x = torch.randn(2, 5, dim, generator=gen, dtype=torch.float64)  # a frozen activation: no gradient wanted
    weights = (param(branches_x_rank, dim, grad=train_v_down), param(bottleneck, branches_x_rank), param(bottleneck),
               param(branches_x_rank, bottleneck), param(dim, branches_x_rank), param(dim))
    # fp32 storage rounds the kept input to float32: the analytic gradient then differs from the numeric
    # one by about 1e-7 relative, far inside gradcheck's tolerance; a wrong formula is off by O(1).
    compact = CompactInput("float32")
    fn = lambda *w: _LowRankAdapterFunction.apply(x, *w, nn.GELU(), compact)  # noqa: E731
    assert torch.autograd.gradcheck(fn, weights, eps=1e-6, atol=1e-5, rtol=1e-3)
