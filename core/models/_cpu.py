"""
Which floating-point type a model computes in on this CPU, and how many threads it uses.

bfloat16 halves the memory a model's weights take, but only a CPU with bfloat16
arithmetic runs it fast: without it, ``torch`` converts every operand to float32 and back,
and a turn of the demo model takes several times as long as in float32. The choice is
therefore made from the CPU's own flags (``/proc/cpuinfo``), not from what ``torch``
happens to support.

Invariants:

- ``choose_dtype`` is a pure function of the flags and the requested dtype: the same
  flags always give the same choice, and its ``reason`` names the flag (or the setting)
  it rests on.
- ``auto`` chooses native bfloat16 when a flag of ``NATIVE_BF16_FLAGS`` is present; on a
  CPU with ``avx2`` but neither of them, bfloat16 weights with prompts computed in float32
  (``prompts_in_float32``), unless the caller cannot afford the float32 copies that takes
  (``float32_copies_allowed=False``: a worker with a tight memory limit), which gets
  float32; anything else (no flags readable, an unknown CPU) chooses float32, which is
  correct everywhere and only slower where bfloat16 would have been native.
- An explicit ``float32`` or ``bfloat16`` is always honoured. An explicit bfloat16 on a
  CPU without bfloat16 arithmetic computes prompts in float32 (``prompts_in_float32``):
  the weights stay the model's bfloat16 values, and only how their products are summed
  changes, by a rule of the CPU's flags and the number of rows alone.
- ``store_for_decoding`` changes where a float32 weight's numbers lie in memory, never
  the numbers: a linear layer computes the same function, and a prompt's prefill gives
  the same logits bit for bit. The rule is a function of the dtype and the layer's shape
  alone (never of a timing), so the same model always decodes the same way here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, get_args

Dtype = Literal["float32", "bfloat16"]
DtypeSetting = Literal["auto", "float32", "bfloat16"]
DTYPE_SETTINGS: Final[tuple[str, ...]] = get_args(DtypeSetting)

#: The ``/proc/cpuinfo`` flags of bfloat16 arithmetic: AVX512_BF16 (AMD Zen 4 and later,
#: Intel Cooper Lake and Sapphire Rapids) and AMX-BF16 (Intel Sapphire Rapids and later).
NATIVE_BF16_FLAGS: Final = ("avx512_bf16", "amx_bf16")
#: The flags a benchmark reports beside its figures.
REPORTED_FLAGS: Final = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
CPUINFO: Final = Path("/proc/cpuinfo")


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """
    The dtype a model is loaded in, and why.

    Attributes:
        dtype: ``float32`` or ``bfloat16``.
        reason: What decided it, e.g. ``cpu flag avx512_bf16`` or ``model.dtype setting``.
        prompts_in_float32: bfloat16 on a CPU without bfloat16 arithmetic: products of
            several rows (a prompt) are computed in float32 (``prompts_in_float32``).
    """

    dtype: Dtype
    reason: str
    prompts_in_float32: bool = False

    def describe(self) -> str:
        how = ", prompts computed in float32" if self.prompts_in_float32 else ""
        return f"{self.dtype} ({self.reason}{how})"


def choose_dtype(flags: Iterable[str], requested: str = "auto", *,
                 float32_copies_allowed: bool = True) -> DtypeChoice:
    """
    The dtype to compute in, given the CPU's flags and the configured setting.

    ``auto`` on an AVX2 CPU without bfloat16 arithmetic chooses bfloat16 weights with
    prompts computed in float32. Where it was measured (docs/performance.md), that is
    the fastest way on such a CPU: its decoding products stream half float32's bytes
    through torch's vectorised AVX2 kernels (``bf16_dot_with_fp32_arith`` and MKL's
    ``xgemv_bf16bf16f32``, seen under valgrind, whose CPU has no AVX-512), and its prompts
    are float32's products, never the emulated bfloat16 matrix product that made the
    issue's reporter's turns 30-43 s.

    Args:
        flags: The CPU's flags as ``/proc/cpuinfo`` spells them (``cpu_flags()``).
        requested: ``auto``, ``float32`` or ``bfloat16``.
        float32_copies_allowed: Whether ``auto`` may choose bfloat16 with float32 prompt
            copies (for the demo model 1.4 GB of copies, 2.4 GB in all against float32's
            2.0 GB); without them it chooses float32 on such a CPU.

    Raises:
        ValueError: ``requested`` is none of the three.
    """
    if requested not in DTYPE_SETTINGS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_SETTINGS)}, not {requested!r}")
    if requested == "float32":
        return DtypeChoice("float32", "set in the configuration")
    present = frozenset(flags)
    if requested == "bfloat16":
        return DtypeChoice("bfloat16", "set in the configuration",
                           prompts_in_float32=present.isdisjoint(NATIVE_BF16_FLAGS))
    for flag in NATIVE_BF16_FLAGS:
        if flag in present:
            return DtypeChoice("bfloat16", f"cpu flag {flag}: native bfloat16")
    missing = f"no {' or '.join(NATIVE_BF16_FLAGS)} cpu flag"
    if "avx2" in present and float32_copies_allowed:
        return DtypeChoice("bfloat16", f"cpu flag avx2, {missing}: bfloat16 weights",
                           prompts_in_float32=True)
    return DtypeChoice("float32", f"{missing}: bfloat16 would be emulated")


def cpu_flags(cpuinfo: Path = CPUINFO) -> frozenset[str]:
    """
    The flags of the first processor in ``/proc/cpuinfo``; empty where it cannot be read
    (another OS, a restricted sandbox), which makes ``choose_dtype`` choose float32.
    """
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str:
    """The first processor's model name, or ``unknown``."""
    try:
        text = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "unknown"
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == "model name":
            return value.strip()
    return "unknown"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), at least one."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def store_for_decoding(torch: Any, model: Any, dtype: str) -> int:
    """
    Store the float32 weights of the linear layers that widen (more outputs than inputs:
    the MLP's gate and up projections, and the vocabulary head) input-major, and return
    how many were changed.

    A decoding step multiplies one row of activations by every weight: it is bound by
    how fast the weights stream from memory. ``torch`` hands ``F.linear``'s row times a
    transposed output-major weight to the BLAS as a transposed product, which streams a
    wide weight at about half the memory bandwidth an input-major one gets (measured on
    AVX2 and AVX-512 with torch's MKL; ``bench/model_turn.py``). bfloat16 weights are left
    as they are: there the output-major product is the faster one. A tied weight (the
    vocabulary head is the embedding table) changes for both, which an embedding lookup
    reads as fast either way.
    """
    if dtype != "float32":
        return 0
    changed = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.out_features > module.in_features
                and module.weight.dtype == torch.float32 and module.weight.is_contiguous()):
            module.weight.data = module.weight.data.t().contiguous().t()
            changed += 1
    return changed


def prompts_in_float32(torch: Any, model: Any) -> int:
    """
    Make a bfloat16 model's linear layers compute a product of several rows (a prompt)
    in float32, and return how many layers were changed; one row (a decoding step) stays
    a bfloat16 product.

    For a CPU without bfloat16 arithmetic (no flag of ``NATIVE_BF16_FLAGS``), where
    ``bfloat16`` was set or ``auto`` chose it (``choose_dtype``). There ``torch``
    computes a bfloat16 matrix product of many rows by converting operands one by one,
    about four times float32's time (the demo model's 650-token prefix: 12.2 s against
    3.4 s, capped at AVX2), while its one-row product is a vectorised kernel that
    streams half float32's bytes, about twice as fast as float32 (57 ms against 109 ms a
    decoding step). Each layer therefore keeps a float32 copy of its weight, made the
    first time it multiplies several rows: exact, since every bfloat16 value is a
    float32 value. The float32 product sums in float32 and is rounded to bfloat16 once,
    as a bfloat16 product's float32 accumulator is. The copies cost memory (1.4 GB for
    the demo model; a vocabulary head that only ever multiplies the last row gets none).
    Calling it twice changes nothing more.

    Layers are changed by giving the instance its own ``forward``, as ``accelerate``'s
    module hooks do; the weights and the state dict stay as they are.
    """
    changed = 0
    for module in model.modules():
        if (isinstance(module, torch.nn.Linear) and module.weight.dtype == torch.bfloat16
                and not isinstance(module.__dict__.get("forward"), _RowsInFloat32)):
            module.forward = _RowsInFloat32(torch, module)
            changed += 1
    return changed


class _RowsInFloat32:
    """One linear layer's forward for ``prompts_in_float32``."""

    def __init__(self, torch: Any, layer: Any) -> None:
        self._torch = torch
        self._layer = layer
        self._weight: Any = None
        self._bias: Any = None

    def __call__(self, rows: Any) -> Any:
        linear = self._torch.nn.functional.linear
        layer = self._layer
        if rows.numel() == rows.shape[-1]:
            return linear(rows, layer.weight, layer.bias)
        if self._weight is None:
            with self._torch.inference_mode(False), self._torch.no_grad():
                self._bias = None if layer.bias is None else layer.bias.detach().float()
                self._weight = layer.weight.detach().float()
        return linear(rows.float(), self._weight, self._bias).to(rows.dtype)
