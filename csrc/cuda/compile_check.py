"""Compile every csrc/cuda/*.cu with nvcc for sm_80 and sm_90a and report per kernel: registers, spills, stack,
shared memory (from ptxas -v), and whether ptxas had to serialize wgmma or inject waits (sm_90a). No torch and no GPU
needed: the kernel sources include no torch headers.

    python csrc/cuda/compile_check.py           # report
    python csrc/cuda/compile_check.py --check   # also exit 1 on a compile failure, a spill, a wgmma advisory or
                                                # a warp-specialized kernel short of its register budget or with
                                                # static shared memory

Without nvcc the report is skipped (exit 0) with a loud SKIPPED line.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.dirname(HERE)
ARCHS = (("sm_80", "arch=compute_80,code=sm_80"), ("sm_90a", "arch=compute_90a,code=sm_90a"))

_FUNC = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
# ptxas advisories C75xx: wgmma serialized, warpgroup waits injected because GMMA results are used too early, or
# setmaxnreg ignored (the register count at entry unknown)
_ADVISORY = re.compile(r"\(C75\d\d\)[^\n]*(?:wgmma|GMMA|warpgroup|setmaxnreg)[^\n]*")
# The warp-specialized kernels: a producer warpgroup and two consumer warpgroups (3 x 128 threads) that trade
# registers with setmaxnreg. A block holds the register count ptxas gives the kernel at entry, and setmaxnreg.inc
# waits until the producer's released registers cover the consumers' increase: unless entry x 384 covers
# 128 x kProducerRegs + 256 x kConsumerRegs (csrc/cuda/tma.cuh), the consumers wait forever. Their swizzled tiles
# need 1024-byte aligned shared memory, which `extern __shared__ __align__(1024)` gives only while no static shared
# memory comes before the dynamic one: a static `__shared__` variable would shift every tile and silently break the
# swizzle, so the check also fails on static shared memory in them.
WARP_SPECIALIZED = ("attention_fwd_wgmma_kernel", "gemm_tn_wgmma_kernel")


def demangle(names):
    """Readable kernel names: demangled, without namespaces, return type and parameter list."""
    cxxfilt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not cxxfilt or not names:
        return {n: n for n in names}
    out = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    if len(out) != len(names):
        return {n: n for n in names}
    short = {}
    for name, pretty in zip(names, out):
        pretty = pretty.replace("(anonymous namespace)::", "").replace("fastlm_cuda::", "")
        pretty = re.sub(r"^void ", "", pretty)
        pretty = re.sub(r"\((\w+::)*Epilogue\)(\d)", r"epilogue\2", pretty)
        short[name] = re.sub(r"\([^()]*\)$", "", pretty)
    return short


def parse_ptxas(text):
    """[{kernel, arch, regs, spill_st, spill_ld, stack, smem}] from nvcc -Xptxas -v output."""
    rows, cur = [], None
    for line in text.splitlines():
        m = _FUNC.search(line)
        if m:
            cur = {"kernel": m.group(1), "arch": m.group(2), "regs": 0, "spill_st": 0, "spill_ld": 0, "stack": 0,
                   "smem": 0}
            rows.append(cur)
            continue
        if cur is None:
            continue
        m = _STACK.search(line)
        if m:
            cur["stack"], cur["spill_st"], cur["spill_ld"] = (int(x) for x in m.groups())
        m = _USED.search(line)
        if m:
            cur["regs"] = int(m.group(1))
            s = _SMEM.search(line)
            cur["smem"] = int(s.group(1)) if s else 0
    return rows


def wgmma_advisories(text):
    """ptxas's wgmma performance advisories in nvcc -Xptxas -v output (serialized wgmma, injected warpgroup waits)."""
    return [m.group(0) for m in _ADVISORY.finditer(text)]


def entry_registers_needed():
    """The register count the warp-specialized kernels need at entry, from tma.cuh's split (allocated in units of 8)."""
    with open(os.path.join(HERE, "tma.cuh")) as f:
        producer, consumer = map(int, re.search(r"kProducerRegs = (\d+), kConsumerRegs = (\d+)", f.read()).groups())
    threads = 3 * 128
    return -(-(128 * producer + 2 * 128 * consumer) // (8 * threads)) * 8


def compile_one(nvcc, src, arch_name, gencode, outdir):
    obj = os.path.join(outdir, f"{os.path.basename(src)}.{arch_name}.o")
    # the flags of setup.py's extension build, so the figures are those of the kernels that run
    cmd = [nvcc, "-c", src, "-o", obj, f"-gencode={gencode}", "-Xptxas", "-v", "-std=c++17", "-O3",
           "--use_fast_math", "--expt-relaxed-constexpr", "-DFASTLM_CUDA_SM90A", "-I", CSRC, "-Werror", "all-warnings"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return src, arch_name, proc.returncode, proc.stdout + proc.stderr, time.time() - t0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 on a compile failure, a spill, a wgmma advisory "
                    "or a warp-specialized kernel short of its register budget or with static shared memory")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("=" * 72 + "\nSKIPPED: nvcc not found; CUDA kernels were not compiled or checked\n" + "=" * 72)
        return 0
    sources = sorted(glob.glob(os.path.join(HERE, "*.cu")))
    if not sources:
        print("no csrc/cuda/*.cu files")
        return 0
    failed, spills, advisories, short, static_smem = [], [], [], [], []
    need, seen = entry_registers_needed(), set()
    with tempfile.TemporaryDirectory() as tmp, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        t0 = time.time()
        jobs = [pool.submit(compile_one, nvcc, s, a, g, tmp) for s in sources for a, g in ARCHS]
        results = sorted((j.result() for j in jobs), key=lambda r: (r[0], r[1]))
        elapsed = time.time() - t0
    for src, arch, rc, out, secs in results:
        name = os.path.relpath(src, CSRC)
        if rc != 0:
            failed.append(f"{name} [{arch}]")
            print(f"\n{name} [{arch}]: COMPILE FAILED\n{out}")
            continue
        advisories += [f"{name} [{arch}]: {a}" for a in wgmma_advisories(out)]
        rows = [r for r in parse_ptxas(out) if r["arch"] == arch]
        pretty = demangle(sorted({r["kernel"] for r in rows}))
        print(f"\n{name} [{arch}] ({secs:.1f} s)")
        print(f"  {'regs':>4} {'spill st/ld':>11} {'stack':>5} {'smem':>6}  kernel")
        for r in sorted(rows, key=lambda r: pretty[r["kernel"]]):
            flag = ""
            if r["spill_st"] or r["spill_ld"]:
                spills.append(f"{pretty[r['kernel']]} [{arch}]")
                flag = "  <-- SPILLS"
            ws = [w for w in WARP_SPECIALIZED if w in pretty[r["kernel"]]]   # (mangled too, without c++filt)
            if ws and arch == "sm_90a":
                seen.update(ws)
                if r["regs"] < need:
                    short.append(f"{pretty[r['kernel']]} [{arch}]: {r['regs']} registers at entry, setmaxnreg "
                                 f"needs {need}")
                    flag = "  <-- REGISTERS"
                if r["smem"]:
                    static_smem.append(f"{pretty[r['kernel']]} [{arch}]: {r['smem']} bytes of static shared memory "
                                       "(the swizzled tiles need the dynamic shared memory 1024-byte aligned)")
                    flag += "  <-- STATIC SMEM"
            print(f"  {r['regs']:>4} {r['spill_st']:>5}/{r['spill_ld']:<5} {r['stack']:>5} {r['smem']:>6}  "
                  f"{pretty[r['kernel']]}{flag}")
    if not failed:  # a renamed kernel must not drop out of the register check unnoticed
        short += [f"{w}: not found in the sm_90a report" for w in WARP_SPECIALIZED if w not in seen]
    print(f"\n{len(sources)} files x {len(ARCHS)} archs compiled in {elapsed:.1f} s "
          f"({args.jobs} jobs); failures: {len(failed)}; spilling kernels: {len(spills)}; "
          f"wgmma advisories: {len(advisories)}; warp-specialized kernels short of {need} registers: {len(short)}, "
          f"with static shared memory: {len(static_smem)}")
    for f in failed:
        print(f"FAILED: {f}")
    for s in spills:
        print(f"SPILLS: {s}")
    for s in advisories:
        print(f"WGMMA: {s}")
    for s in short:
        print(f"REGISTERS: {s}")
    for s in static_smem:
        print(f"STATIC SMEM: {s}")
    return 1 if args.check and (failed or spills or advisories or short or static_smem) else 0


if __name__ == "__main__":
    sys.exit(main())
