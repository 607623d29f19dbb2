"""Matmul precision of negCLIPLoss: fp32, tf32 or bf16 products, float32 logsumexp always.

- fp32: float32 products (on CUDA with TF32 switched off).
- tf32: inputs rounded to TF32's 10-bit mantissa, float32 accumulation. Native on CUDA (Ampere
  and later); on the CPU the rounding is emulated, which gives the GPU's numbers at fp32 speed.
  Float16 store rows have 10-bit mantissas, so their TF32 products are exact products.
- bf16: inputs rounded to bfloat16 (8-bit mantissa), float32 accumulation and float32 output
  (`torch.mm(..., out_dtype=float32)` on CUDA; emulated on the CPU by rounding the inputs).

The default is tf32 on a CUDA device that has it and fp32 everywhere else: the agreement of
each precision with fp32 is measured by benchmarks/bench_precision.py (README). The CPU has no
fast bf16 or TF32 matmul, so a request for either on the CPU runs fp32 and says so in one line.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

PRECISIONS = ("fp32", "tf32", "bf16")
TF32_DROPPED_BITS = 13  # float32 has 23 mantissa bits, TF32 keeps 10


def round_to_tf32(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest TF32 value (ties to even), still as float32."""
    bits = x.float().contiguous().view(torch.int32)
    half = (1 << (TF32_DROPPED_BITS - 1)) - 1
    odd = (bits >> TF32_DROPPED_BITS) & 1
    rounded = (bits + half + odd) & ~((1 << TF32_DROPPED_BITS) - 1)
    return rounded.view(torch.float32)


def round_to_bf16(x: torch.Tensor) -> torch.Tensor:
    """float32 values rounded to the nearest bfloat16 value (ties to even), still as float32."""
    return x.float().to(torch.bfloat16).float()


def _float32_output_mm(device: torch.device) -> bool:
    """True when torch can multiply bf16 matrices into float32 on `device` (torch >= 2.8)."""
    x = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        return torch.mm(x, x, out_dtype=torch.float32).dtype == torch.float32
    except (TypeError, RuntimeError):
        return False


def _cuda_has(precision: str, device: torch.device) -> bool:
    ampere = torch.cuda.get_device_capability(device)[0] >= 8
    if precision == "bf16":
        return ampere and torch.cuda.is_bf16_supported() and _float32_output_mm(device)
    if precision == "tf32":
        return ampere
    return True


def resolve_precision(requested: str | None, device: torch.device) -> tuple[str, str | None]:
    """The precision to run on `device` (None: the device's default), and a one-line note when a
    requested one is not available there."""
    if requested is not None and requested not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if device.type != "cuda":
        if requested in (None, "fp32"):
            return "fp32", None
        return (
            "fp32",
            f"--precision {requested}: the CPU has no fast {requested} matmul, using fp32",
        )
    if requested is None:
        return ("tf32" if _cuda_has("tf32", device) else "fp32"), None
    if _cuda_has(requested, device):
        return requested, None
    name = torch.cuda.get_device_name(device)
    return "fp32", f"--precision {requested}: {name} has no {requested} matmul; using fp32"


@contextmanager
def cuda_matmul(precision: str, device: torch.device) -> Iterator[None]:
    """CUDA float32 matmuls in TF32 for `tf32`, in full float32 otherwise, for the block."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul
    if hasattr(flags, "fp32_precision"):
        before = flags.fp32_precision
        flags.fp32_precision = "tf32" if precision == "tf32" else "ieee"
        try:
            yield
        finally:
            flags.fp32_precision = before
        return
    before = flags.allow_tf32
    flags.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        flags.allow_tf32 = before


def operand(x: torch.Tensor, precision: str) -> torch.Tensor:
    """A batch's rows as the matmul takes them: bf16 on CUDA for bf16, float32 otherwise (rounded
    as the GPU would when emulating tf32 or bf16 on the CPU)."""
    if precision == "bf16":
        return x.to(torch.bfloat16) if x.is_cuda else round_to_bf16(x)
    if precision == "tf32" and not x.is_cuda:
        return round_to_tf32(x)
    return x.float()


def product(a: torch.Tensor, b_t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """a @ b_t into the float32 buffer `out` (bf16 operands accumulate and return in float32)."""
    if a.dtype == torch.bfloat16:
        try:
            return torch.mm(a, b_t, out_dtype=torch.float32, out=out)
        except (TypeError, RuntimeError):
            return out.copy_(torch.mm(a, b_t, out_dtype=torch.float32))
    return torch.matmul(a, b_t, out=out)
