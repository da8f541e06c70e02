"""Scratch benchmark: the C++ CPU fused MLPs (torch.ops.fastlm.mlp_swiglu / mlp_gelu) against torch eager
(F.linear + activation + F.linear) in the same run, timed alternately.

    python bench/dev/cpu_ffn.py [--threads 2] [--reps 7] [--tokens 1,16,128,1024] [--dtype float32]

Shapes: Llama-style SwiGLU d=512, intermediate 1408; GPT-2 GELU d=768, intermediate 3072. Reports GFLOP/s
(2 * tokens * d * inter per GEMM) and the ratio torch time / fastlm time. See bench/dev/cpu_notes.md.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import fastlm._C  # noqa: F401  (registers torch.ops.fastlm)


def compare(fns, reps):
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--tokens", default="1,16,128,1024")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    print(f"fused MLP vs torch eager, {args.dtype}, threads={torch.get_num_threads()} (GFLOP/s, median)")
    for name, d, inter in (("swiglu", 512, 1408), ("gelu", 768, 3072)):
        for n in (int(t) for t in args.tokens.split(",")):
            x = torch.randn(n, d, dtype=dtype)
            if name == "swiglu":
                wg, wu = (torch.randn(inter, d, dtype=dtype) / math.sqrt(d) for _ in range(2))
                wd = torch.randn(d, inter, dtype=dtype) / math.sqrt(inter)
                ours = lambda: torch.ops.fastlm.mlp_swiglu(x, wg, wu, wd, None)
                ref = lambda: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd)
                flops = 3 * 2 * n * d * inter
            else:
                wf, wp = torch.randn(inter, d, dtype=dtype) / math.sqrt(d), torch.randn(d, inter, dtype=dtype)
                bf, bp = torch.randn(inter, dtype=dtype), torch.randn(d, dtype=dtype)
                ours = lambda: torch.ops.fastlm.mlp_gelu(x, wf, bf, wp, bp, None)
                ref = lambda: F.linear(F.gelu(F.linear(x, wf, bf), approximate="tanh"), wp, bp)
                flops = 2 * 2 * n * d * inter
            t_o, t_r = compare([ours, ref], args.reps)
            print(f"  {name:6s} d={d} inter={inter} tokens={n:5d}  fastlm {flops / t_o / 1e9:6.1f}   "
                  f"torch {flops / t_r / 1e9:6.1f}   ratio {t_r / t_o:4.2f}")


if __name__ == "__main__":
    main()
