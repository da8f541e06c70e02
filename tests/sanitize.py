"""The C++ CPU kernels' tests under AddressSanitizer and UndefinedBehaviorSanitizer.

    python tests/sanitize.py [pytest arguments]      (or: make sanitize)

Builds fastlm._C with FASTLM_SANITIZE=address,undefined into build/sanitize/<march>/ (the regular build is left
alone), then runs pytest in a child process with the ASan runtime preloaded (the Python interpreter is not
instrumented) and fastlm._C taken from that build. Where the host runs x86-64-v3, twice: built for AVX2 + FMA
(x86-64-v3: 8-lane vectors and bf16's fp32-widening kernels, which an AVX-512 host's native build does not run)
with the whole selection, then for baseline x86-64 (SSE2: 4 lanes, no FMA, simd.h's generic branches) with
test_cpu_ext.py; elsewhere once, for the host's own instruction set. A read or write past any
tensor the kernels are given, a use after free, or undefined behaviour (signed overflow, misaligned access, an
out-of-range shift...) aborts the run with a report.

torch's CPU allocator hands out exactly the bytes a tensor needs, so ASan's red zone starts right after its last
element: the tests' inputs are caught one element out of bounds (a slice of a larger tensor is not).

Without pytest arguments it runs every test that calls a C++ CPU kernel: all of test_cpu_ext.py and the cases of the
other op and model tests whose id names the cpu backend or the native ops (the Triton interpreter's cases measure
nothing here); with arguments, those in each build. On 2 cores: ~5 minutes to build the first time, ~2 to run.
`make test` runs it too (CI).
"""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "sanitize")
SANITIZERS = "address,undefined"
DEFAULT = ["tests/test_cpu_ext.py", "tests/test_decode.py", "tests/test_linear.py", "tests/test_attention.py",
           "tests/test_ffn.py", "tests/test_norm.py", "tests/test_rope.py", "tests/test_cross_entropy.py",
           "tests/test_model.py", "tests/test_generate.py", "tests/test_backends.py", "tests/test_ops_compile.py",
           "-k", "cpu or native"]
# the builds and the vector extensions fastlm._C.cpu_isa must then list; x86-64-v3's instructions as /proc/cpuinfo
# names them
V3_BUILDS = (("x86-64-v3", ("AVX2", "FMA"), DEFAULT), ("x86-64", (), ["tests/test_cpu_ext.py"]))
V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


def builds():
    """(march, cpu_isa, default tests) per build: V3_BUILDS where the host runs x86-64-v3 and the compiler knows the
    level names (GCC >= 11, Clang >= 12); elsewhere (another architecture, an older x86 or compiler) one build for the
    host's own instruction set (native), its ISA unchecked."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        flags = set()
    compiler = os.environ.get("CXX", "g++")
    known = all(subprocess.run([compiler, f"-march={arch}", "-x", "c++", "-E", "-"], input="", capture_output=True,
                               text=True).returncode == 0 for arch, _, _ in V3_BUILDS)
    return V3_BUILDS if V3_FLAGS <= flags and known else (("native", None, DEFAULT),)
# leaks: CPython and torch keep allocations alive until exit by design; alloc_dealloc_mismatch: the interpreter and
# torch are not instrumented, so their allocator pairs are not ASan's to judge
ASAN_OPTIONS = "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def build(arch):
    env = dict(os.environ, FASTLM_SANITIZE=SANITIZERS, FASTLM_NO_CUDA="1", FASTLM_MARCH=arch)
    out = os.path.join(OUT, arch)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(out, "lib"),
           "--build-temp", os.path.join(out, "tmp")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    found = glob.glob(os.path.join(out, "lib", "fastlm", "_C*.so"))
    if not found:
        sys.exit(f"sanitize: the build wrote no fastlm/_C*.so under {out}/lib")
    return found[0]


def runtime(name):
    path = subprocess.run(["g++", f"-print-file-name={name}"], capture_output=True, text=True, check=True).stdout
    path = path.strip()
    if not os.path.isabs(path):  # g++ echoes the bare name when it has no such library
        sys.exit(f"sanitize: g++ has no {name} (install the compiler's sanitizer runtime, e.g. Debian's libasan8)")
    return path


def run_child(lib, pytest_args):
    """In the child: load the sanitized fastlm._C before fastlm itself asks for it, then run pytest."""
    import importlib.util

    import torch  # noqa: F401  (the extension links against the libraries torch loads)
    spec = importlib.util.spec_from_file_location("fastlm._C", lib)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastlm._C"] = module
    spec.loader.exec_module(module)

    from fastlm import backends
    assert backends.extension() is module, "fastlm did not take the sanitized extension"
    isa = os.environ["FASTLM_SANITIZE_ISA"]
    if isa != "unchecked":
        assert module.cpu_isa == tuple(filter(None, isa.split(","))), \
            f"the sanitized extension was built for {module.cpu_isa}, not {isa!r}"
    import pytest
    # --capture=sys: a sanitizer writes its report to file descriptor 2 and aborts, which pytest's default capture of
    # the descriptors would swallow
    return pytest.main(["-q", "-p", "no:cacheprovider", "--capture=sys", *pytest_args])


def main(argv):
    if argv[:1] == ["--child"]:
        return run_child(argv[1], argv[2:])
    if os.environ.get("FASTLM_NO_EXTENSION") == "1":
        print("sanitize: skipped, FASTLM_NO_EXTENSION=1 (no C++ kernels are built)")
        return 0
    # libstdc++ with it: ASan intercepts __cxa_throw, and finds no real one to call unless libstdc++ is loaded when it
    # starts (python itself does not link it)
    preload = ":".join([runtime("libasan.so"), runtime("libstdc++.so")])
    for arch, isa, default in builds():
        lib = build(arch)  # incremental: recompiles what changed since the last sanitizer build
        print(f"sanitize: fastlm._C built for -march={arch}", flush=True)
        # (the ISA for the child's check of the build; CPU tensors only, and the child imports triton first)
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS,
                   FASTLM_SANITIZE_ISA="unchecked" if isa is None else ",".join(isa), FASTLM_TEST_DEVICE="cpu",
                   TRITON_INTERPRET="1")
        child = [sys.executable, os.path.abspath(__file__), "--child", lib, *(argv or default)]
        rc = subprocess.run(child, cwd=ROOT, env=env).returncode
        if rc != 0:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
