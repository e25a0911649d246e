"""Which CPU instructions the bundled llama.cpp may use, and whether a build keeps to them.

llama.cpp builds with `-march=native` by default (GGML_NATIVE=ON): the library then uses
whatever the building CPU has, AVX-512 and AMX included, and dies with SIGILL on a CPU
(or a kernel) without them, sometimes on the very machine that built it. The bundled
backend is built for a fixed instruction-set level instead, chosen from what this CPU has:

- `x86-64-v3`: GGML_NATIVE=OFF, which leaves AVX, AVX2, FMA, F16C and BMI2 on. Any CPU
  with AVX2: Intel Haswell (2013) and later, AMD Excavator/Zen (2015/2017) and later.
- `x86-64-v2`: the same with AVX, AVX2, FMA, F16C and BMI2 off (SSE4.2), for x86-64 CPUs
  without AVX2. Chosen only where the CPU lacks one of those.
- `armv8-a`: GGML_NATIVE=OFF, the compiler's baseline for aarch64 (NEON): any 64-bit Arm.

A build is checked by what it reports it was compiled with (`llama_print_system_info()`
lists the instruction sets whose compiler macros were on): every one must be in the
profile, and on this CPU. Pure: the callers read /proc/cpuinfo and run the child.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# llama_print_system_info() names -> the /proc/cpuinfo flag that says the CPU has it.
X86_FEATURE_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX_VNNI": "avx_vnni",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "AMX_INT8": "amx_int8",
}
ARM_FEATURE_FLAGS = {
    "NEON": "asimd",
    "ARM_FMA": "asimd",
    "FP16_VA": "asimdhp",
    "MATMUL_INT8": "i8mm",
    "SVE": "sve",
    "DOTPROD": "asimddp",
    "SME": "sme",
    "SME2": "sme2",
}
# Names in the system info that are not instruction sets (ignored by the check).
NON_ISA = frozenset({"LLAMAFILE", "OPENMP", "REPACK", "KLEIDIAI", "CPU_HBM", "ACCELERATE"})

_V3_NEEDS = frozenset({"avx", "avx2", "fma", "f16c", "bmi2"})


@dataclass(frozen=True, slots=True)
class BuildProfile:
    name: str
    cmake_args: tuple[str, ...]
    allowed: frozenset[str]  # instruction sets (system-info names) the build may use

    @property
    def cmake_args_str(self) -> str:
        return " ".join(self.cmake_args)


X86_64_V3 = BuildProfile(
    "x86-64-v3",
    ("-DGGML_NATIVE=OFF",),
    frozenset({"SSE3", "SSSE3", "AVX", "AVX2", "F16C", "FMA", "BMI2"}),
)
X86_64_V2 = BuildProfile(
    "x86-64-v2",
    (
        "-DGGML_NATIVE=OFF",
        "-DGGML_AVX=OFF",
        "-DGGML_AVX2=OFF",
        "-DGGML_FMA=OFF",
        "-DGGML_F16C=OFF",
        "-DGGML_BMI2=OFF",
    ),
    frozenset({"SSE3", "SSSE3"}),
)
ARMV8_A = BuildProfile("armv8-a", ("-DGGML_NATIVE=OFF",), frozenset({"NEON", "ARM_FMA"}))


class UnsupportedMachine(ValueError):
    """No portable profile for this machine."""


def choose_profile(machine: str, cpu_flags: Iterable[str]) -> BuildProfile:
    """The profile for `machine` (`platform.machine()`) and its CPU flags."""
    flags = frozenset(cpu_flags)
    if machine in ("x86_64", "AMD64", "amd64"):
        return X86_64_V3 if flags >= _V3_NEEDS else X86_64_V2
    if machine in ("aarch64", "arm64"):
        return ARMV8_A
    raise UnsupportedMachine(
        f"no portable build profile for {machine!r}: the bundled backend supports x86-64 "
        "and aarch64 Linux"
    )


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo's text (x86 `flags`, Arm `Features`)."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def compiled_features(system_info: str) -> frozenset[str]:
    """Instruction sets a build was compiled with, from `llama_print_system_info()`:
    `"CPU : SSE3 = 1 | AVX2 = 1 | ... | OPENMP = 1 |"` -> {"SSE3", "AVX2"}."""
    found = set()
    for part in system_info.replace("\n", "|").split("|"):
        name, eq, value = part.rpartition("=")
        if not eq:
            continue
        name = name.split(":")[-1].strip()
        if value.strip() == "1" and name not in NON_ISA:
            found.add(name)
    return frozenset(found)


def build_problems(
    compiled: frozenset[str], profile: BuildProfile, machine_flags: frozenset[str]
) -> list[str]:
    """Why a build with these compiled instruction sets is wrong here ([] when it is fine)."""
    problems = []
    extra = sorted(compiled - profile.allowed)
    if extra:
        problems.append(
            f"it was compiled for instructions outside the portable {profile.name} profile "
            f"({', '.join(extra)}): a build made with -march=native, here or elsewhere"
        )
    table = {**X86_FEATURE_FLAGS, **ARM_FEATURE_FLAGS}
    missing = sorted(f for f in compiled if f in table and table[f] not in machine_flags)
    if missing and machine_flags:
        problems.append(f"this CPU lacks instructions it was compiled for ({', '.join(missing)})")
    return problems
