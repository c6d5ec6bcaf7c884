"""Tests of wsm_megatron.kernels: both backends (Triton through its interpreter on CPU).

References are independent of the code under test:

* ``ref64``: the exact-ish sum in float64 (error bounds below);
* ``contract``: the documented arithmetic (fp32 product, fp32 sum, in input order, RTNE to the
  output dtype) emulated in NumPy, which both backends must match bit for bit.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from wsm_megatron import kernels
from wsm_megatron.kernels import torch_backend, triton_backend

BACKENDS = ["torch", "triton"]
LOW = (torch.bfloat16, torch.float16)
U32 = 2.0**-24


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Backend name; "triton" runs on CPU under the interpreter (env set for this test only)."""
    if request.param == "triton":
        if not triton_backend.is_available():
            pytest.skip("triton not installed")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return request.param


def rand(shape, dtype=torch.float32, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def ref64(xs, ws) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 sum and sum of |terms| (for error bounds)."""
    total = sum(x.double() * w for x, w in zip(xs, ws, strict=True))
    mag = sum((x.double() * w).abs() for x, w in zip(xs, ws, strict=True))
    return total, mag


def _bf16_rtne(f32: np.ndarray) -> np.ndarray:
    bits = f32.view(np.uint32).astype(np.uint64)
    r = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint32)
    r[np.isnan(f32)] = 0x7FC0
    return (r << 16).view(np.float32)


def contract(xs, ws, out_dtype) -> torch.Tensor:
    """NumPy emulation of the documented fp32 arithmetic, rounded to ``out_dtype``."""
    with np.errstate(all="ignore"):
        w32 = [np.float32(w) for w in ws]
        acc = xs[0].float().numpy().reshape(-1) * w32[0]
        for x, w in zip(xs[1:], w32[1:], strict=True):
            acc = acc + x.float().numpy().reshape(-1) * w
    if out_dtype == torch.bfloat16:
        return torch.from_numpy(_bf16_rtne(acc)).to(torch.bfloat16).view(xs[0].shape)
    return torch.from_numpy(acc).to(out_dtype).view(xs[0].shape)


def ulp(v: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    a = v.abs().to(dtype)
    return (torch.nextafter(a, torch.full_like(a, float("inf"))) - a).double()


def assert_close_to_ref(out, xs, ws, acc_unit=U32):
    """fp32/fp64 out: recursive-summation bound (k+2)u sum|w x|; bf16/fp16 out: also 1 ulp."""
    total, mag = ref64(xs, ws)
    bound = (len(xs) + 2) * acc_unit * mag + 1e-300
    if out.dtype in LOW:
        bound = bound + ulp(total, out.dtype)
    err = (out.double() - total).abs()
    assert bool((err <= bound).all()), f"max excess {(err - bound).max().item()}"


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bits, NaN included (0x7FC0 etc.); tensors of the same dtype."""
    ia = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(ia), b.contiguous().view(ia))


# --------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("n", [0, 1, 7, 1023, 4097])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 16])
def test_fp32_sizes_and_k(backend, n, k):
    xs = [rand(n, seed=j) for j in range(k)]
    ws = [float(w) for w in rand(k, seed=99)]
    ws[0] = 0.0 if k > 2 else ws[0]
    out = kernels.weighted_sum(xs, ws, backend=backend)
    assert out.dtype == torch.float32 and out.shape == (n,)
    assert bitwise_equal(out, contract(xs, ws, torch.float32))
    assert_close_to_ref(out, xs, ws)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_mixed_input_dtypes(backend, out_dtype):
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float64]
    xs = [rand((33, 31), d, seed=j) for j, d in enumerate(dtypes)]
    ws = [0.1, 0.25, 0.3, 0.15, 0.2]
    out = kernels.weighted_sum(xs, ws, out_dtype=out_dtype, backend=backend)
    assert out.dtype == out_dtype
    assert_close_to_ref(out, xs, ws)
    if out_dtype != torch.float64:
        assert bitwise_equal(out, contract(xs, ws, out_dtype))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_default_out_dtype(backend, dtype):
    xs = [rand(2049, dtype, seed=j) for j in range(4)]
    ws = [0.4, 0.3, 0.2, 0.1]
    out = kernels.weighted_sum(xs, ws, backend=backend)
    assert out.dtype == dtype
    assert bitwise_equal(out, contract(xs, ws, dtype))
    assert_close_to_ref(out, xs, ws)


def test_backends_agree_bitwise(monkeypatch):
    if not triton_backend.is_available():
        pytest.skip("triton not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    xs = [rand(3001, d, seed=j) for j, d in enumerate([torch.float32, torch.bfloat16] * 3)]
    ws = [float(w) for w in rand(6, seed=7)]
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for acc_dtype in (torch.float32, torch.float64):
            a, b = (
                kernels.weighted_sum(xs, ws, out_dtype=out_dtype, acc_dtype=acc_dtype, backend=be)
                for be in BACKENDS
            )
            assert bitwise_equal(a, b), (out_dtype, acc_dtype)


def test_fp64_accumulation(backend):
    xs = [rand(1500, torch.float32, seed=j) for j in range(6)]
    ws = [float(w) for w in rand(6, seed=3)]
    out = kernels.weighted_sum(
        xs, ws, out_dtype=torch.float64, acc_dtype=torch.float64, backend=backend
    )
    assert_close_to_ref(out, xs, ws, acc_unit=2.0**-53)
    out32 = kernels.weighted_sum(xs, ws, acc_dtype=torch.float64, backend=backend)
    total, _ = ref64(xs, ws)
    assert bool(((out32.double() - total).abs() <= ulp(total, torch.float32)).all())


def test_fp64_accumulator_rounds_through_fp32(backend):
    """fp64 -> bf16/fp16 goes through fp32 (double rounding), exactly like ``Tensor.to``."""
    v = torch.tensor(
        [1 + 2**-8 + 2**-30, 1 + 2**-11 + 2**-40, -1 - 2**-8 - 2**-30], dtype=torch.float64
    )
    for dtype in LOW:
        out = kernels.weighted_sum(
            [v], [1.0], out_dtype=dtype, acc_dtype=torch.float64, backend=backend
        )
        assert bitwise_equal(out, v.float().to(dtype))


def test_non_contiguous(backend):
    base = [rand((40, 50), torch.float32, seed=j) for j in range(3)]
    xs = [base[0].t(), base[1][:, ::2].repeat(1, 2).t(), base[2].t().to(torch.bfloat16)]
    assert not any(x.is_contiguous() for x in xs)
    ws = [0.5, 0.3, 0.2]
    expect = kernels.weighted_sum([x.contiguous() for x in xs], ws, backend=backend)
    out = kernels.weighted_sum(xs, ws, backend=backend)
    assert bitwise_equal(out, expect)
    strided_out = torch.zeros(50, 80)[:, ::2]
    kernels.weighted_sum(xs, ws, out=strided_out, backend=backend)
    assert bitwise_equal(strided_out, expect)


def test_misaligned_views(backend):
    flat = rand(5000, torch.bfloat16, seed=1)
    xs = [flat[1:2001], flat[1003:3003], flat[2999:4999]]  # 2-byte offsets: no 16-byte alignment
    assert any(x.data_ptr() % 16 for x in xs)
    ws = [0.2, 0.3, 0.5]
    out = kernels.weighted_sum(xs, ws, backend=backend)
    assert bitwise_equal(out, contract(xs, ws, torch.bfloat16))


def test_out_aliases_an_input(backend):
    xs = [rand(777, seed=j) for j in range(3)]
    ws = [0.5, 0.25, 0.25]
    expect = contract(xs, ws, torch.float32)
    kernels.weighted_sum(xs, ws, out=xs[1], backend=backend)
    assert bitwise_equal(xs[1], expect)


def test_torch_backend_chunking(monkeypatch):
    """Tiny buckets (tensors split into chunks, several per bucket) give the same bits."""
    xs = [
        [rand(1000, seed=j), rand((30, 20), torch.bfloat16, seed=j + 9).t(), rand(5, seed=j)]
        for j in range(3)
    ]
    outs = [torch.empty(1000), torch.empty((20, 30), dtype=torch.bfloat16), torch.empty(5)]
    ws = [0.2, 0.3, 0.5]
    kernels.weighted_sum_multi(outs, xs, ws, backend="torch")
    monkeypatch.setitem(torch_backend._CHUNK, "cpu", 64)
    small = [torch.empty_like(o) for o in outs]
    kernels.weighted_sum_multi(small, xs, ws, backend="torch")
    assert all(bitwise_equal(a, b) for a, b in zip(outs, small, strict=True))


# --------------------------------------------------------------------------- multi-tensor


def _shard(num: int, k: int, seed: int = 0):
    """A fake model shard: ``num`` tensors of assorted shapes and dtypes, k checkpoints."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (num,), generator=g).tolist()
    sizes[:4] = [0, 1, 256, 4096]
    shapes = [(s,) if t % 3 else (s // 16, 16) if s >= 16 else (s,) for t, s in enumerate(sizes)]
    out_dtypes = [torch.float32 if t % 5 == 0 else torch.bfloat16 for t in range(num)]
    specs = list(enumerate(zip(shapes, out_dtypes, strict=True)))
    inputs = [[rand(sh, d, seed=100 * j + t) for t, (sh, d) in specs] for j in range(k)]
    return shapes, out_dtypes, inputs


def test_multi_many_tensors(backend, monkeypatch):
    shapes, out_dtypes, inputs = _shard(60, 4)
    ws = [0.1, 0.2, 0.3, 0.4]
    outs = [torch.empty(sh, dtype=d) for sh, d in zip(shapes, out_dtypes, strict=True)]
    launches = []
    if backend == "triton":
        kernel = triton_backend._kernel(True)

        class Counting:
            def __getitem__(self, grid):
                launches.append(grid)
                return kernel[grid]

        monkeypatch.setattr(triton_backend, "_kernel", lambda interpret: Counting())
    result = kernels.weighted_sum_multi(outs, inputs, ws, backend=backend)
    assert all(r is o for r, o in zip(result, outs, strict=True))
    for t, out in enumerate(outs):
        xs = [inputs[j][t] for j in range(4)]
        assert bitwise_equal(out, contract(xs, ws, out.dtype)), t
        assert_close_to_ref(out, xs, ws)
    if backend == "triton":
        assert len(launches) <= 4  # 2 dtype groups x (full blocks, tails)


def test_multi_matches_single(backend):
    _, _, inputs = _shard(12, 3, seed=5)
    ws = [0.3, 0.3, 0.4]
    outs = [torch.empty_like(x) for x in inputs[0]]
    kernels.weighted_sum_multi(outs, inputs, ws, backend=backend)
    for t, out in enumerate(outs):
        single = kernels.weighted_sum([xs[t] for xs in inputs], ws, backend=backend)
        assert bitwise_equal(out, single)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64])
def test_accumulate_streaming_equals_weighted_sum(backend, acc_dtype):
    _, _, inputs = _shard(10, 5, seed=2)
    ws = [0.05, 0.15, 0.2, 0.25, 0.35]
    acc = [torch.zeros(x.shape, dtype=acc_dtype) for x in inputs[0]]
    for xs, w in zip(inputs, ws, strict=True):
        assert kernels.accumulate_(acc, xs, w, backend=backend)[0] is acc[0]
    for t, a in enumerate(acc):
        full = kernels.weighted_sum(
            [xs[t] for xs in inputs], ws, out_dtype=acc_dtype, acc_dtype=acc_dtype, backend=backend
        )
        assert torch.equal(a, full)  # equal up to the sign of zero


def test_accumulate_non_contiguous_acc(backend):
    acc = torch.zeros(30, 20).t()
    x = rand((20, 30), torch.float16, seed=4)
    kernels.accumulate_([acc], [x], 0.5, backend=backend)
    kernels.accumulate_([acc], [x], 0.25, backend=backend)
    expect = x.float() * 0.5 + x.float() * 0.25
    assert torch.equal(acc, expect)


# --------------------------------------------------------------------------- NaN / Inf


@pytest.mark.parametrize("flag_dtype", [torch.float32, torch.int32, torch.int64])
def test_nonfinite_detected(backend, flag_dtype):
    for bad, pos, j in ((float("nan"), 5, 1), (float("inf"), 4096, 0), (float("-inf"), 700, 2)):
        xs = [rand(4097, torch.bfloat16, seed=i) for i in range(3)]
        xs[j][pos] = bad
        ws = [0.5, 0.0, 0.5]  # weight 0 still propagates: 0 * inf = nan
        found = torch.zeros(1, dtype=flag_dtype)
        out = kernels.weighted_sum(xs, ws, backend=backend, found_nonfinite=found)
        assert found.item() == 1, (bad, pos)
        assert not torch.isfinite(out[pos])
        assert torch.isfinite(torch.cat([out[:pos], out[pos + 1 :]])).all()


def test_no_false_positive_and_sticky(backend):
    xs = [rand(5000, seed=i) * 1e3 for i in range(4)]
    found = torch.zeros(1)
    kernels.weighted_sum(xs, [0.25] * 4, backend=backend, found_nonfinite=found)
    assert found.item() == 0
    outs = [torch.empty(5000), torch.empty(0)]
    kernels.weighted_sum_multi(
        outs, [[x, torch.empty(0)] for x in xs], [0.25] * 4, backend=backend, found_nonfinite=found
    )
    assert found.item() == 0
    xs[3][4999] = float("nan")  # tail block
    kernels.weighted_sum(xs, [0.25] * 4, backend=backend, found_nonfinite=found)
    assert found.item() == 1
    kernels.weighted_sum(xs[:3], [0.25] * 3, backend=backend, found_nonfinite=found)
    assert found.item() == 1  # never reset, like AMP's found_inf


def test_nonfinite_in_accumulate_and_overflow(backend):
    acc = [torch.zeros(300), torch.zeros(10)]
    found = torch.zeros(1, dtype=torch.int32)
    kernels.accumulate_(acc, [rand(300), rand(10)], 0.5, backend=backend, found_nonfinite=found)
    assert found.item() == 0
    x = rand(10, torch.float16)
    x[3] = float("inf")
    kernels.accumulate_(acc, [rand(300), x], 0.0, backend=backend, found_nonfinite=found)
    assert found.item() == 1 and torch.isnan(acc[1][3])
    # Finite inputs whose sum overflows fp16 are reported too (documented).
    found.zero_()
    big = [torch.full((5,), 60000.0, dtype=torch.float16)] * 2
    out = kernels.weighted_sum(big, [1.0, 1.0], backend=backend, found_nonfinite=found)
    assert found.item() == 1 and torch.isinf(out).all()


# --------------------------------------------------------------------------- validation


def test_validation_errors():
    x = torch.zeros(4)
    cases = [
        (lambda: kernels.weighted_sum([], []), "non-empty"),
        (lambda: kernels.weighted_sum([x, torch.zeros(5)], [1, 1]), "shape mismatch"),
        (
            lambda: kernels.weighted_sum([x, torch.zeros(4, dtype=torch.int32)], [1, 1]),
            "unsupported dtype",
        ),
        (lambda: kernels.weighted_sum([x], [1], out_dtype=torch.int8), "unsupported out_dtype"),
        (lambda: kernels.weighted_sum([x, x], [1.0]), "got 1 weights for 2 inputs"),
        (lambda: kernels.weighted_sum([x], [float("nan")]), "finite"),
        (lambda: kernels.weighted_sum([x, x.to("meta")], [1, 1]), "device mismatch"),
        (lambda: kernels.weighted_sum([x], [1], backend="cuda"), "backend must be"),
        (lambda: kernels.weighted_sum([x], [1], acc_dtype=torch.float16), "acc_dtype"),
        (lambda: kernels.weighted_sum([x], [1], out=x, out_dtype=torch.float16), "contradicts"),
        (lambda: kernels.weighted_sum([x], [1], found_nonfinite=torch.zeros(2)), "1 element"),
        (
            lambda: kernels.weighted_sum(
                [x], [1], found_nonfinite=torch.zeros(1, dtype=torch.bool)
            ),
            "found_nonfinite has unsupported dtype",
        ),
        (lambda: kernels.weighted_sum_multi([x], [], [1]), "k >= 1"),
        (lambda: kernels.weighted_sum_multi([], [[]], [1]), "outputs is empty"),
        (lambda: kernels.weighted_sum_multi([x, x], [[x]], [1]), "list of 2 tensors"),
        (lambda: kernels.accumulate_([x.bfloat16()], [x], 1.0), "unsupported dtype"),
        (lambda: kernels.accumulate_([x, x.double()], [x, x], 1.0), "same dtype"),
        (lambda: kernels.accumulate_([x], [x, x], 1.0), "1 accumulators for 2 tensors"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1|not installed"):
        kernels.weighted_sum([torch.zeros(3)], [1.0], backend="triton")
    assert kernels.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch\n"
        "from wsm_megatron import kernels\n"
        "assert not kernels.triton_available()\n"
        "out = kernels.weighted_sum([torch.ones(3), torch.ones(3)], [0.5, 0.25])\n"
        "assert out.tolist() == [0.75] * 3\n"
        "try:\n"
        "    kernels.weighted_sum([torch.ones(3)], [1.0], backend='triton')\n"
        "except ValueError as e:\n"
        "    assert 'not installed' in str(e)\n"
        "else:\n"
        "    raise SystemExit('no error')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------- real GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_triton_matches_torch():
    if not triton_backend.is_available() or kernels.interpret_mode():
        pytest.skip("needs compiled triton")
    dev = torch.device("cuda")
    dtypes = [torch.bfloat16, torch.float32, torch.float16, torch.bfloat16]
    xs = [rand(1_000_003, d, seed=j).to(dev) for j, d in enumerate(dtypes)]
    ws = [0.1, 0.2, 0.3, 0.4]
    assert kernels.resolve_backend("auto", dev) == "triton"
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        found = torch.zeros(1, device=dev)
        a = kernels.weighted_sum(
            xs, ws, out_dtype=out_dtype, backend="triton", found_nonfinite=found
        )
        b = kernels.weighted_sum(xs, ws, out_dtype=out_dtype, backend="torch")
        assert bitwise_equal(a, b) and found.item() == 0
        assert bitwise_equal(a.cpu(), contract([x.cpu() for x in xs], ws, out_dtype))
