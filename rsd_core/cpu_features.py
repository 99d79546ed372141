"""Whether this CPU runs bfloat16 natively (x86 cpuinfo flags).

Without AVX512-BF16 or AMX the CPU emulates bfloat16: a training step of the small preset took
over 5 s against 1.2 s in float32 on this project's 2-core AVX2 EPYC.
"""

from pathlib import Path

import torch

CPUINFO = Path('/proc/cpuinfo')
NATIVE_BF16_FLAGS = frozenset({'avx512_bf16', 'amx_bf16'})
EMULATED_BF16_WARNING = ('dtype bfloat16 on a CPU without avx512_bf16 or amx_bf16: bfloat16 is '
                         'emulated here and many times slower than float32')


def cpu_flags(cpuinfo: Path | None = None) -> frozenset[str] | None:
    """The CPU's feature flags (the first `flags` line of `cpuinfo`, default CPUINFO); None
    where there is no such file or line (not Linux x86)."""
    try:
        text = (cpuinfo or CPUINFO).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() == 'flags':
            return frozenset(value.split())
    return None


def emulated_bfloat16(device: torch.device, dtype: torch.dtype | None,
                      cpuinfo: Path | None = None) -> bool:
    """True when computing in `dtype` on `device` would run bfloat16 on an x86 CPU that lacks
    native bfloat16 (its flags known and none of NATIVE_BF16_FLAGS among them). Reads cpuinfo
    only for bfloat16 on the CPU."""
    if device.type != 'cpu' or dtype is not torch.bfloat16:
        return False
    flags = cpu_flags(cpuinfo)
    return flags is not None and not flags & NATIVE_BF16_FLAGS
