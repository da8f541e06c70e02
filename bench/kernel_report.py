"""Ahead-of-time compile report for every Triton kernel in fastlm.kernels (no GPU needed).

Each kernel module exposes ``aot_specs()``: its kernels at their default GPU configurations, with the arguments that
Triton would specialize at run time (16-byte aligned pointers, sizes divisible by 16) marked in ``attrs``. This script
compiles them
for sm_90 (H100/H200) with ``triton.compile(..., target=GPUTarget("cuda", 90, 32))`` and prints, per kernel:
registers per thread, spilled (local) bytes, stack bytes, shared memory, and whether the PTX uses wgmma (Hopper
warpgroup tensor-core MMA) or mma.sync.

    python bench/kernel_report.py            # table
    python bench/kernel_report.py --check    # also fail on compile errors, spills, or a missing expected wgmma
    python bench/kernel_report.py --json out.json
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, never through the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def _cuobjdump() -> str:
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return path if os.path.exists(path) else "cuobjdump"


def resource_usage(cubin: bytes) -> dict:
    """REG, STACK, SHARED, LOCAL of the (single) kernel in a cubin, read with cuobjdump --dump-resource-usage."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([_cuobjdump(), "--dump-resource-usage", path], capture_output=True, text=True,
                              check=True).stdout
    finally:
        os.unlink(path)
    usage = {}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", text)
        usage[key.lower()] = int(m.group(1)) if m else None
    return usage


def compile_spec(spec: dict) -> dict:
    src = triton.compiler.ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                                    attrs=spec.get("attrs"))
    compiled = triton.compile(src, target=TARGET,
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    ptx = compiled.asm["ptx"]
    row = {"kernel": spec["name"], "num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
           "wgmma": "wgmma.mma_async" in ptx, "mma_sync": bool(re.search(r"\bmma\.sync", ptx)),
           "expect_wgmma": bool(spec.get("expect_wgmma", False))}
    row.update(resource_usage(compiled.asm["cubin"]))
    row["shared"] = max(row.get("shared") or 0, compiled.metadata.shared)
    return row


def kernel_modules():
    import fastlm.kernels as pkg
    for info in pkgutil.iter_modules(pkg.__path__):
        if not info.name.startswith("_"):
            yield info.name, importlib.import_module(f"fastlm.kernels.{info.name}")


def problems(row: dict) -> list[str]:
    out = []
    if row.get("error"):
        out.append(f"does not compile: {row['error']}")
        return out
    if row.get("local"):
        out.append(f"spills {row['local']} bytes to local memory")
    if row.get("stack"):
        out.append(f"uses {row['stack']} bytes of stack")
    if row["expect_wgmma"] and not row["wgmma"]:
        out.append("expected wgmma in the PTX, found none")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit non-zero on errors, spills or missing wgmma")
    parser.add_argument("--json", help="write the rows to this JSON file")
    parser.add_argument("--only", help="comma-separated kernel modules (default: all)")
    args = parser.parse_args(argv)

    rows = []
    only = set(args.only.split(",")) if args.only else None
    for name, module in kernel_modules():
        if only and name not in only:
            continue
        if not hasattr(module, "aot_specs"):
            rows.append({"kernel": f"{name}.*", "error": "module has no aot_specs()", "expect_wgmma": False})
            continue
        for spec in module.aot_specs():
            try:
                rows.append(compile_spec(spec))
            except Exception as e:  # reported (and failed under --check), never hidden
                rows.append({"kernel": spec["name"], "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                             "expect_wgmma": bool(spec.get("expect_wgmma"))})

    header = f"{'kernel':<46} {'warps':>5} {'stg':>3} {'regs':>5} {'local':>6} {'stack':>6} {'smem':>7}  mma"
    print(f"Triton {triton.__version__}, target sm_90 (compiled ahead of time, no GPU)\n{header}\n{'-' * len(header)}")
    failed = []
    for row in rows:
        if row.get("error"):
            print(f"{row['kernel']:<46} ERROR {row['error']}")
        else:
            mma = "wgmma" if row["wgmma"] else ("mma.sync" if row["mma_sync"] else "-")
            print(f"{row['kernel']:<46} {row['num_warps']:>5} {row['num_stages']:>3} {row['reg']:>5} "
                  f"{row['local']:>6} {row['stack']:>6} {row['shared']:>7}  {mma}")
        for p in problems(row):
            failed.append(f"{row['kernel']}: {p}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if failed:
        print("\nproblems:\n  " + "\n  ".join(failed))
    if not rows:
        print("no kernels found")
        return 1 if args.check else 0
    return 1 if (args.check and failed) else 0


if __name__ == "__main__":
    sys.exit(main())
