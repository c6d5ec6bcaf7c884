"""Compile the Triton kernel for an sm_90 GPU without one (PTX only) and inspect the code.

Guards what the interpreter cannot see: the kernel compiles for a real GPU (including the
runtime dtype branch), full blocks use 16-byte vector loads and stores, and no FMA is formed
(the contract rounds products and sums separately).
"""

from __future__ import annotations

import re

import pytest

triton = pytest.importorskip("triton")
compiler = pytest.importorskip("triton.compiler")
backends = pytest.importorskip("triton.backends.compiler")

from wsm_megatron.kernels import triton_backend, triton_kernel  # noqa: E402

POINTERS = {
    "addr_ptr": "*i64",
    "out_addr_ptr": "*i64",
    "numel_ptr": "*i64",
    "code_ptr": "*i64",
    "w_ptr": "*fp64",
    "blk_t_ptr": "*i64",
    "blk_i_ptr": "*i64",
    "flag_ptr": "*fp32",
    "K": "i32",
}


def ptx(**constexprs) -> str:
    fn = triton.runtime.jit.JITFunction(triton_kernel.weighted_sum_kernel)
    names = fn.arg_names
    signature = {n: POINTERS.get(n, "constexpr") for n in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in POINTERS if n != "K"}
    consts = dict(ACC_FP64=False, MASKED=False, ALIGNED=True, CHECK=True)
    consts.update(constexprs, BLOCK=triton_backend.BLOCK)
    src = compiler.ASTSource(fn, signature, constexprs=consts, attrs=attrs)
    options = {"num_warps": triton_backend.NUM_WARPS, "enable_fp_fusion": False}
    kernel = triton.compile(src, target=backends.GPUTarget("cuda", 90, 32), options=options)
    return kernel.asm["ptx"]


@pytest.fixture(autouse=True)
def _compiled_mode(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_bf16_full_blocks_vectorized_without_fma():
    code = ptx(IN_CODE=1, OUT_CODE=1)
    assert "ld.global.v4.b32" in code and "st.global.v4.b32" in code
    assert "ld.global.b16" not in code  # no scalar element loads
    assert not re.search(r"\bfma\.", code)


def test_mixed_dtypes_and_fp64_accumulator_compile():
    mixed = ptx(IN_CODE=triton_backend.MIXED, OUT_CODE=0)
    assert "ld.global.v4.b32" in mixed and not re.search(r"\bfma\.", mixed)
    assert not re.search(r"\bfma\.", ptx(IN_CODE=1, OUT_CODE=1, ACC_FP64=True, MASKED=True))
