"""chatglm/cpu_intdot.py: integer dot products of the official INT4 / INT8 bytes with activations rounded to int16
per 8 inputs give x @ Q.T to within that rounding (~100x finer than bfloat16's) for every row count and shape,
carry non-finite inputs through, decline what they cannot run, and stay right when two threads call at once."""
import threading

import pytest
import torch

from chatglm import cpu_intdot
from chatglm.quantization import pack_int4

pytestmark = pytest.mark.skipif(not cpu_intdot.available(),
                                reason="cpu_intdot's loops need numba, llvmlite and an AVX2 CPU")


def weight_and_values(bits, out_features, in_features, g):
    low, high = (-8, 8) if bits == 4 else (-127, 128)
    q = torch.randint(low, high, (out_features, in_features), generator=g, dtype=torch.int8)
    return (pack_int4(q) if bits == 4 else q), q.double()


def assert_within_int16_rounding(y, x, values):
    """Each input moves by at most half a step of its group's scale (absmax of 8 inputs / 32767), so an output by at
    most sum |q| * absmax / 65534 over its inputs (taken here with every group's absmax at the row's: looser by
    the spread, still ~100x tighter than a bfloat16 rounding of x), plus float32 sums."""
    exact = x.double() @ values.T
    row_max = x.double().abs().amax(1, keepdim=True)  # [rows, 1]
    bound = row_max * values.abs().sum(1)[None] / 65534 + 1e-6 * (x.double().abs() @ values.abs().T) + 1e-5
    assert y.dtype == torch.float32 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= bound).all(), ((y.double() - exact).abs() / bound).max()
    # and it is far inside bfloat16's: the same x rounded to bfloat16 is ~100x further from the exact product
    bf16 = x.bfloat16().double() @ values.T
    assert (y.double() - exact).norm() * 20 < (bf16 - exact).norm()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9])
@pytest.mark.parametrize("out_features,in_features", [(1, 64), (37, 128), (100, 256)])
def test_every_row_count_and_shape_gives_the_product(bits, rows, out_features, in_features):
    g = torch.Generator().manual_seed(rows * 100 + out_features + bits)
    w, values = weight_and_values(bits, out_features, in_features, g)
    # a few large inputs, as real activations have: each group of 8 gets its own scale
    x = torch.randn(rows, in_features, generator=g) * torch.where(torch.rand(rows, in_features, generator=g) < 0.02,
                                                                    30.0, 1.0)
    assert_within_int16_rounding(cpu_intdot.matmul(x, w, bits), x, values)


@pytest.mark.parametrize("bits", [8, 4])
def test_zero_rows_and_non_finite_inputs_come_out_as_in_any_other_path(bits):
    g = torch.Generator().manual_seed(bits)
    w, values = weight_and_values(bits, 40, 128, g)
    x = torch.randn(3, 128, generator=g)
    x[0] = 0
    x[1, 5] = float("nan")
    x[2, 70] = float("inf")
    y = cpu_intdot.matmul(x, w, bits)
    assert (y[0] == 0).all()
    assert torch.isnan(y[1]).all() and not torch.isfinite(y[2]).any()


def test_input_sizes_it_cannot_run_are_declined():
    g = torch.Generator().manual_seed(0)
    w, _ = weight_and_values(8, 8, 70, g)
    assert cpu_intdot.matmul(torch.randn(1, 70), w, 8) is None  # not whole groups of 64: the caller's float loop


def test_two_threads_calling_at_once_each_get_their_own_product():
    g = torch.Generator().manual_seed(0)
    w, values = weight_and_values(4, 512, 256, g)
    xs = [torch.randn(r, 256, generator=g) for r in (1, 4, 6, 1)]
    results, errors = {}, []

    def work(i):
        try:
            for _ in range(20):
                results[i] = cpu_intdot.matmul(xs[i], w, 4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i, x in enumerate(xs):
        assert_within_int16_rounding(results[i], x, values)
