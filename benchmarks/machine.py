"""The machine a benchmark ran on, as its results table names it."""

import platform

# CPU flags that change which kernels torch runs: bf16 autocast on a CPU without AVX-512 bf16 or AMX is emulated and
# an order of magnitude slower than fp32, so a figure means little without them.
VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def _cpuinfo() -> tuple[str | None, set[str]]:
    name, flags = None, set()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if name is None and line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif not flags and line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return name, flags


def cpu_name() -> str:
    """The CPU's model name with its vector extensions (e.g. "AMD EPYC [avx2]"), else what platform knows."""
    name, flags = _cpuinfo()
    name = name or platform.processor() or platform.machine() or "cpu"
    present = [flag for flag in VECTOR_FLAGS if flag in flags]
    return f"{name} [{' '.join(present)}]" if flags else name
