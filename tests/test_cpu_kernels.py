"""chatglm/cpu_kernels.py: the weight-streaming decode loops give x @ W.T for every row count and shape (odd
output counts, rows not a multiple of 4), from the official bytes, and stay right when two threads call at once."""
import threading

import pytest
import torch

from chatglm import cpu_kernels
from chatglm.quantization import pack_int4

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


def weight_and_values(bits, out_features, in_features, g):
    """(the weight as the kernel reads it, its values as float64)."""
    if bits == 0:
        w = torch.randn(out_features, in_features, generator=g).bfloat16()
        return w, w.double()
    low, high = (-8, 8) if bits == 4 else (-127, 128)
    q = torch.randint(low, high, (out_features, in_features), generator=g, dtype=torch.int8)
    return (pack_int4(q) if bits == 4 else q), q.double()


@pytest.mark.parametrize("bits", [0, 8, 4])
@pytest.mark.parametrize("rows", [1, 3, 4, 7, 8, 9])
@pytest.mark.parametrize("out_features", [1, 37, 64])
def test_every_row_count_and_shape_gives_the_product(bits, rows, out_features):
    g = torch.Generator().manual_seed(rows * 100 + out_features + bits)
    w, values = weight_and_values(bits, out_features, 70, g)
    x = torch.randn(rows, 70, generator=g).bfloat16()
    exact = x.double() @ values.T
    y = cpu_kernels.matmul(x, w, bits)
    assert y.dtype == torch.float32 and y.shape == (rows, out_features)
    # float32 sums of 70 products, in whatever order the vectorised loop takes
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-4 * (1 + exact.abs().max().item()))


def test_two_threads_calling_at_once_each_get_their_own_product():
    g = torch.Generator().manual_seed(0)
    w, values = weight_and_values(4, 512, 256, g)
    xs = [torch.randn(2, 256, generator=g) for _ in range(2)]
    results, errors = {}, []

    def run(i):
        try:
            for _ in range(20):
                results[i] = cpu_kernels.matmul(xs[i], w, 4)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for i in range(2):
        torch.testing.assert_close(results[i].double(), xs[i].double() @ values.T, rtol=1e-5, atol=1e-3)
