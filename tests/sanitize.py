"""The C++ CPU kernels' tests under AddressSanitizer and UndefinedBehaviorSanitizer.

    python tests/sanitize.py [pytest arguments]      (or: make sanitize)

Builds fastlm._C with FASTLM_SANITIZE=address,undefined for AVX2 + FMA (FASTLM_MARCH=x86-64-v3, where the host runs
it) into build/sanitize/ (the regular build is left alone), then runs pytest in a child process with the ASan runtime
preloaded (the Python interpreter is not instrumented) and fastlm._C taken from that build. A read or write past any
tensor the kernels are given, a use after free, or undefined behaviour (signed overflow, misaligned access, an
out-of-range shift...) aborts the run with a report.

torch's CPU allocator hands out exactly the bytes a tensor needs, so ASan's red zone starts right after its last
element: the tests' inputs are caught one element out of bounds (a slice of a larger tensor is not).

Without pytest arguments it runs every test that calls a C++ CPU kernel: all of test_cpu_ext.py and the cases of the
other op and model tests whose id names the cpu backend (the Triton interpreter's cases measure nothing here). On 2
cores: ~3 minutes to build the first time, ~2 to run. `make test` runs it too (CI).
"""
import glob
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "build", "sanitize")
SANITIZERS = "address,undefined"
# AVX2 + FMA, no AVX-512: the regular build is -march=native, so on a host with AVX-512 (and AVX512-BF16) this build is
# the one that runs the 8-lane kernels and bf16's widening ones. x86-64-v3's instructions, as /proc/cpuinfo names them
V3, V3_ISA = "x86-64-v3", ("AVX2", "FMA")
V3_FLAGS = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}


def march():
    """x86-64-v3 where the host runs it; elsewhere (another architecture, an older x86) the regular build's native."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        flags = set()
    return V3 if V3_FLAGS <= flags else "native"
DEFAULT = ["tests/test_cpu_ext.py", "tests/test_decode.py", "tests/test_linear.py", "tests/test_attention.py",
           "tests/test_ffn.py", "tests/test_norm.py", "tests/test_rope.py", "tests/test_cross_entropy.py",
           "tests/test_model.py", "tests/test_generate.py", "-k", "cpu"]
# leaks: CPython and torch keep allocations alive until exit by design; alloc_dealloc_mismatch: the interpreter and
# torch are not instrumented, so their allocator pairs are not ASan's to judge
ASAN_OPTIONS = "detect_leaks=0:alloc_dealloc_mismatch=0:abort_on_error=1:halt_on_error=1"
UBSAN_OPTIONS = "print_stacktrace=1:halt_on_error=1"


def build(arch):
    env = dict(os.environ, FASTLM_SANITIZE=SANITIZERS, FASTLM_NO_CUDA="1", FASTLM_MARCH=arch)
    cmd = [sys.executable, "setup.py", "-q", "build_ext", "--build-lib", os.path.join(OUT, "lib"),
           "--build-temp", os.path.join(OUT, "tmp")]
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    found = glob.glob(os.path.join(OUT, "lib", "fastlm", "_C*.so"))
    if not found:
        sys.exit(f"sanitize: the build wrote no fastlm/_C*.so under {OUT}/lib")
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
    if os.environ["FASTLM_MARCH"] == V3:
        assert module.cpu_isa == V3_ISA, f"the sanitized extension was built for {module.cpu_isa}, not {V3_ISA}"
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
    arch = march()
    lib = build(arch)  # incremental: recompiles what changed since the last sanitizer build
    # libstdc++ with it: ASan intercepts __cxa_throw, and finds no real one to call unless libstdc++ is loaded when it
    # starts (python itself does not link it)
    preload = ":".join([runtime("libasan.so"), runtime("libstdc++.so")])
    print(f"sanitize: fastlm._C built for -march={arch}", flush=True)
    # (FASTLM_MARCH: for the child's check of the build; CPU tensors only, and the child imports triton first)
    env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS=ASAN_OPTIONS, UBSAN_OPTIONS=UBSAN_OPTIONS,
               FASTLM_MARCH=arch, FASTLM_TEST_DEVICE="cpu", TRITON_INTERPRET="1")
    child = [sys.executable, os.path.abspath(__file__), "--child", lib, *(argv or DEFAULT)]
    return subprocess.run(child, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
