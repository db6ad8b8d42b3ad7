"""The fused state update of the fixed-step loop: ``out = x + a v1 (+ b v2)`` as one Triton kernel on
CUDA (fp32 accumulation, one rounding to the state's dtype), the same arithmetic in torch elsewhere."""

from __future__ import annotations

import torch

from .._triton import interpreting, tl, triton, use_kernel

__all__ = ["update", "TRITON_DTYPES"]

if triton is not None:

    @triton.jit
    def _ode_update_kernel(
        x_ptr,  # [n] state, any float dtype
        v1_ptr,  # [n] velocity
        v2_ptr,  # [n] second velocity (read only when TWO)
        out_ptr,  # [n] new state, x's dtype; may alias x_ptr
        a,  # fp32 scalar: coefficient of v1
        b,  # fp32 scalar: coefficient of v2
        n,
        TWO: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        # out = x + (a*v1 + b*v2) in fp32, rounded once to the state's dtype. The velocities are
        # combined first: it keeps x + (h/2)(v + v) == x + h v exactly, as in the torch path.
        pid = tl.program_id(0).to(tl.int64)
        offs = pid * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        step = a * tl.load(v1_ptr + offs, mask=mask).to(tl.float32)
        if TWO:
            step += b * tl.load(v2_ptr + offs, mask=mask).to(tl.float32)
        x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
        tl.store(out_ptr + offs, (x + step).to(out_ptr.dtype.element_ty), mask=mask)


TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK = 1024


def _use_triton(x: torch.Tensor) -> bool:
    # float64 states keep the torch path: Triton passes Python floats as fp32, which would round h.
    if triton is None or x.dtype not in TRITON_DTYPES:
        return False
    if not use_kernel(x.device):
        return False
    if not x.is_cuda and not interpreting():
        raise RuntimeError("loom_kernels._triton.KERNELS_ON_CPU needs TRITON_INTERPRET=1 set before triton is imported")
    return True


def update(x, v1, v2, a: float, b: float, out) -> None:
    """out = x + a*v1 (+ b*v2); `out` is contiguous and may be `x` itself (elementwise, safe)."""
    if out.numel() == 0:
        return
    if _use_triton(out):
        # TWO from the argument, not from identity: a model may return the same tensor for both stages
        two = v2 is not None
        v1 = v1.contiguous()
        v2 = v2.contiguous() if two else v1
        n = out.numel()
        _ode_update_kernel[(triton.cdiv(n, _BLOCK),)](
            x,
            v1,
            v2,
            out,
            float(a),
            float(b),
            n,
            TWO=two,
            BLOCK=_BLOCK,
            num_warps=4,
        )
        return
    if v2 is not None:  # velocities first, as in the kernel: x + (a v1 + b v2)
        v1 = torch.add(v1 * a, v2, alpha=b)
        a = 1.0
    torch.add(x, v1, alpha=a, out=out)
