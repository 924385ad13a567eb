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


def attention_float64(q, k, v, scale):
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return scores.softmax(-1) @ v.double()


@pytest.mark.parametrize("rows,heads,n,dim", [(1, 2, 1, 8), (1, 5, 7, 64), (3, 4, 33, 128), (2, 32, 200, 128)])
def test_decode_attention_over_a_cache_view_is_softmax_of_the_scores_times_the_values(rows, heads, n, dim):
    """q [B, H, 1, D] against the first n positions of bfloat16 cache buffers [B, H, capacity, D], as the KV cache
    hands them to attention: the float64 result rounded once to bfloat16 (the kernel works in float32)."""
    g = torch.Generator().manual_seed(rows * heads + n)
    capacity = n + 11
    k_buffer, v_buffer = (torch.randn(rows, heads, capacity, dim, generator=g).bfloat16() for _ in range(2))
    k, v = k_buffer[:, :, :n], v_buffer[:, :, :n]
    q = torch.randn(rows, heads, 1, dim, generator=g).bfloat16()
    scale = dim ** -0.5
    out = cpu_kernels.decode_attention(q, k, v, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, heads, 1, dim)
    exact = attention_float64(q, k, v, scale)
    torch.testing.assert_close(out.double(), exact, rtol=2 ** -7, atol=1e-3)
    k_buffer[:, :, n:] = 1e4  # positions past n are never read
    torch.testing.assert_close(cpu_kernels.decode_attention(q, k, v, scale), out, rtol=0, atol=0)


def test_decode_attention_declines_a_layout_that_is_not_a_cache_view():
    k = torch.randn(1, 2, 8, 5).bfloat16().transpose(2, 3)  # [1, 2, 5, 8] with the positions strided
    q = torch.randn(1, 2, 1, 8).bfloat16()
    assert cpu_kernels.decode_attention(q, k, k, 0.3) is None
