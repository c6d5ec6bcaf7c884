"""The Triton multi-tensor weighted-sum kernel (source only; imported lazily, needs triton).

The function is left undecorated: ``triton_backend`` wraps it with ``triton.jit`` at first
use, so that ``TRITON_INTERPRET`` is read then and not when this module is imported.

One program handles one ``BLOCK`` of one tensor. Per launch, the host passes a table of
input addresses ``addr[t * K + j]`` (int64, cast to typed pointers in the kernel), output
addresses, sizes, and a block table ``(tensor, block index)`` per program. Full blocks are
launched with ``MASKED=False`` (no mask, so loads vectorize when ``ALIGNED``), the tail of
each tensor with ``MASKED=True``.
"""

from __future__ import annotations

import triton.language as tl

# dtype codes (see triton_backend.DTYPE_CODES)
F32: tl.constexpr = tl.constexpr(0)
BF16: tl.constexpr = tl.constexpr(1)
F16: tl.constexpr = tl.constexpr(2)
F64: tl.constexpr = tl.constexpr(3)
MIXED: tl.constexpr = tl.constexpr(-1)


def weighted_sum_kernel(
    addr_ptr,  # *i64 [T*K]: address of input j of tensor t at t*K + j
    out_addr_ptr,  # *i64 [T]: output addresses
    numel_ptr,  # *i64 [T]: element counts
    code_ptr,  # *i64 [K]: dtype code of input j (read only when IN_CODE == MIXED)
    w_ptr,  # *f64 [K]: weights, already exactly representable in the accumulator type
    blk_t_ptr,  # *i64 [grid]: tensor index of each program
    blk_i_ptr,  # *i64 [grid]: block index (within its tensor) of each program
    flag_ptr,  # *f32/i32/i64 [1]: set to 1 when an output element is non-finite
    K,  # number of inputs
    IN_CODE: tl.constexpr,  # dtype code shared by all inputs, or MIXED
    OUT_CODE: tl.constexpr,  # dtype code of the outputs
    ACC_FP64: tl.constexpr,  # accumulate in fp64 instead of fp32
    MASKED: tl.constexpr,  # tail blocks: mask with numel
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (vector loads)
    CHECK: tl.constexpr,  # update flag_ptr
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(blk_t_ptr + pid)
    offs = tl.load(blk_i_ptr + pid) * BLOCK + tl.arange(0, BLOCK)
    if MASKED:
        mask = offs < tl.load(numel_ptr + t)
    else:
        mask = None
    # Only builtins below (tl.full, not tl.zeros/tl.max): the jit'd helpers of
    # triton.language are bound to interpreter or compiler mode when triton is imported.
    if ACC_FP64:
        acc = tl.full([BLOCK], 0, dtype=tl.float64)
    else:
        acc = tl.full([BLOCK], 0, dtype=tl.float32)

    for j in range(K):
        addr = tl.load(addr_ptr + t * K + j)
        if IN_CODE == MIXED:
            code = tl.load(code_ptr + j)
        else:
            code = IN_CODE
        # Static branches when IN_CODE is uniform, a uniform runtime branch when MIXED
        # (one pointer name per branch: runtime branches must not rebind a name's type).
        # The hints on the pointer block (not on the loaded address) enable 16-byte loads.
        if code == F32:
            p_f32 = addr.to(tl.pointer_type(tl.float32)) + offs
            if ALIGNED:
                p_f32 = tl.max_contiguous(tl.multiple_of(p_f32, [16]), [BLOCK])
            x = tl.load(p_f32, mask=mask).to(acc.dtype)
        elif code == BF16:
            p_bf16 = addr.to(tl.pointer_type(tl.bfloat16)) + offs
            if ALIGNED:
                p_bf16 = tl.max_contiguous(tl.multiple_of(p_bf16, [16]), [BLOCK])
            x = tl.load(p_bf16, mask=mask).to(acc.dtype)
        elif code == F16:
            p_f16 = addr.to(tl.pointer_type(tl.float16)) + offs
            if ALIGNED:
                p_f16 = tl.max_contiguous(tl.multiple_of(p_f16, [16]), [BLOCK])
            x = tl.load(p_f16, mask=mask).to(acc.dtype)
        else:
            p_f64 = addr.to(tl.pointer_type(tl.float64)) + offs
            if ALIGNED:
                p_f64 = tl.max_contiguous(tl.multiple_of(p_f64, [16]), [BLOCK])
            x = tl.load(p_f64, mask=mask).to(acc.dtype)
        w = tl.load(w_ptr + j).to(acc.dtype)
        # Product and sum rounded separately (launched with enable_fp_fusion=False).
        p = x * w
        acc = tl.where(j == 0, p, acc + p)

    out_addr = tl.load(out_addr_ptr + t)
    if OUT_CODE == F64:
        y = acc.to(tl.float64)
        bad = (y.to(tl.uint64, bitcast=True) & 0x7FF0000000000000) == 0x7FF0000000000000
        ptrs = out_addr.to(tl.pointer_type(tl.float64)) + offs
    else:
        y = acc.to(tl.float32)
        bits = y.to(tl.uint32, bitcast=True)
        if OUT_CODE == F32:
            bad = (bits & 0x7F800000) == 0x7F800000
            ptrs = out_addr.to(tl.pointer_type(tl.float32)) + offs
        elif OUT_CODE == BF16:
            # Round to nearest even on the bits, as torch does (NaN -> 0x7FC0). The native
            # conversion is also RTNE on GPU, but the interpreter truncates.
            r = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
            r = tl.where(y != y, 0x7FC0, r)
            bad = (r & 0x7F80) == 0x7F80
            y = r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
            ptrs = out_addr.to(tl.pointer_type(tl.bfloat16)) + offs
        else:
            y = y.to(tl.float16)
            bad = (y.to(tl.uint16, bitcast=True) & 0x7C00) == 0x7C00
            ptrs = out_addr.to(tl.pointer_type(tl.float16)) + offs
    if ALIGNED:
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, [16]), [BLOCK])
    tl.store(ptrs, y, mask=mask)
    if CHECK:
        if MASKED:
            bad = bad & mask
        # Predicated store of 1 from the offending lanes only: no traffic when all finite.
        tl.store(flag_ptr + offs * 0, tl.full([BLOCK], 1, dtype=tl.int32), mask=bad)
