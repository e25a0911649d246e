"""The portable build profile for a CPU, and the check of a build's instruction sets."""

from __future__ import annotations

import pytest

from backends.local.bundled.profile import (
    ARMV8_A,
    X86_64_V2,
    X86_64_V3,
    UnsupportedMachine,
    build_problems,
    choose_profile,
    compiled_features,
    cpu_flags,
)
from tests.support.fakes.llama_cpp import NATIVE_INFO, PORTABLE_INFO

# /proc/cpuinfo of a Sapphire Rapids Xeon (abridged): AVX-512 and AMX advertised.
XEON_AMX = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Processor
flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 avx f16c bmi1 avx2 bmi2 avx512f avx512dq \
avx512bw avx512vl avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8
"""
# An x86-64 CPU without AVX2 (Sandy Bridge era).
OLD_X86 = "flags\t\t: fpu sse sse2 pni ssse3 sse4_1 sse4_2 avx\n"
# aarch64 (Neoverse N1, abridged).
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes pmull sha1 sha2 atomics asimdhp asimddp\n"


def test_cpu_flags_from_x86_and_arm_cpuinfo() -> None:
    assert {"avx2", "amx_int8", "avx512f"} <= cpu_flags(XEON_AMX)
    assert cpu_flags(ARM) >= {"asimd", "asimddp"}
    assert cpu_flags("") == frozenset()


def test_profile_by_machine_and_cpu() -> None:
    assert choose_profile("x86_64", cpu_flags(XEON_AMX)) is X86_64_V3
    assert choose_profile("x86_64", cpu_flags(OLD_X86)) is X86_64_V2
    assert choose_profile("aarch64", cpu_flags(ARM)) is ARMV8_A
    with pytest.raises(UnsupportedMachine, match="x86-64 and aarch64"):
        choose_profile("riscv64", frozenset())


def test_every_profile_turns_native_off_and_avx512_and_amx_stay_off() -> None:
    for profile in (X86_64_V3, X86_64_V2, ARMV8_A):
        assert "-DGGML_NATIVE=OFF" in profile.cmake_args
        assert not any("AVX512" in f or "AMX" in f for f in profile.allowed)
    assert "-DGGML_AVX2=OFF" in X86_64_V2.cmake_args


def test_compiled_features_from_system_info() -> None:
    assert compiled_features(PORTABLE_INFO) == X86_64_V3.allowed
    native = compiled_features(NATIVE_INFO)
    assert {"AVX512", "AVX512_VNNI", "AMX_INT8"} <= native
    assert "OPENMP" not in native and "LLAMAFILE" not in native  # not instruction sets
    assert compiled_features("CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 0 |") == {"NEON", "ARM_FMA"}


def test_a_native_build_on_the_amx_xeon_is_refused_and_the_portable_one_kept() -> None:
    flags = cpu_flags(XEON_AMX)
    problems = build_problems(compiled_features(NATIVE_INFO), X86_64_V3, flags)
    assert len(problems) == 1  # the CPU has AMX: the build is wrong by profile, not by CPU
    assert "AMX_INT8, AVX512, AVX512_VNNI" in problems[0] and "-march=native" in problems[0]
    assert build_problems(compiled_features(PORTABLE_INFO), X86_64_V3, flags) == []


def test_a_build_from_another_machine_names_what_this_cpu_lacks() -> None:
    problems = build_problems(compiled_features(PORTABLE_INFO), X86_64_V2, cpu_flags(OLD_X86))
    assert len(problems) == 2
    assert "outside the portable x86-64-v2 profile (AVX, AVX2, BMI2, F16C, FMA)" in problems[0]
    assert "this CPU lacks instructions it was compiled for (AVX2, BMI2, F16C, FMA)" in problems[1]
