"""Scratch benchmark: the C++ CPU attention / decode kernels against torch on this machine, in the same run.

    python bench/dev/cpu_attention.py [--threads 2] [--reps 7] [--only fwd|decode] [--seqlens 256,512,1024,2048]

Attention forward: batch 1, 16 heads, head dim 64, fp32 and bf16, causal and not, against
torch.nn.functional.scaled_dot_product_attention; FLOPs 4*B*H*Sq*Sk*D, halved when causal. Decode: one query per
sequence against a KV cache, GB/s of K and V read, against a measured copy bandwidth and the same op in torch
(SDPA on the cache prefix). The two sides are timed alternately so that load from other processes hits both.
Results go to stdout; see bench/dev/cpu_notes.md for recorded figures.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn.functional as F

import fastlm._C  # noqa: F401  (registers torch.ops.fastlm)


CLOCK = time.perf_counter


def timed(fn):
    t = CLOCK()
    fn()
    return CLOCK() - t


def compare(fns, reps):
    """Median and best time of each function, run alternately after one warm-up each."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(reps):
        for i, f in enumerate(fns):
            times[i].append(timed(f))
    return [(statistics.median(t), min(t)) for t in times]


def bench_fwd(args):
    B, H, D = 1, 16, 64
    print(f"attention forward  B={B} H={H} D={D}  threads={torch.get_num_threads()}  (GFLOP/s median / best)")
    geo = {}
    for dtype in (torch.float32, torch.bfloat16):
        for causal in (True, False):
            for S in args.seqlens:
                q, k, v = (torch.randn(B, S, H, D, dtype=dtype) for _ in range(3))
                qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # SDPA's own layout
                scale = 1.0 / math.sqrt(D)
                ours = lambda: torch.ops.fastlm.attention_fwd(q, k, v, causal, scale, -1, 0 if causal else -1)
                ref = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                (t_o, b_o), (t_r, b_r) = compare([ours, ref], args.reps)
                flops = 4 * B * H * S * S * D / (2 if causal else 1)
                ratio = t_r / t_o
                geo.setdefault((dtype, causal), []).append(ratio)
                print(f"  {str(dtype)[6:]:8s} causal={causal!s:5s} S={S:5d}  fastlm {flops / t_o / 1e9:6.1f} / "
                      f"{flops / b_o / 1e9:6.1f}   torch {flops / t_r / 1e9:6.1f} / {flops / b_r / 1e9:6.1f}   "
                      f"ratio {ratio:4.2f} (best/best {b_r / b_o:4.2f})")
    for (dtype, causal), rs in geo.items():
        g = math.exp(sum(math.log(r) for r in rs) / len(rs))
        print(f"  geomean ratio {str(dtype)[6:]:8s} causal={causal}: {g:.2f}")


def copy_bandwidth(reps):
    src = torch.randn(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    (t, best), = compare([lambda: dst.copy_(src)], reps)
    return 2 * src.numel() * 4 / t / 1e9, 2 * src.numel() * 4 / best / 1e9


def bench_decode(args):
    bw, bw_best = copy_bandwidth(args.reps)
    print(f"decode attention  copy bandwidth {bw:.1f} GB/s (best {bw_best:.1f})  (GB/s of K+V read, median / best)")
    D = 64
    for dtype in (torch.float32, torch.bfloat16):
        for B, H, Hkv, S in ((1, 16, 16, 8192), (1, 32, 8, 32768), (4, 8, 4, 4096)):
            q = torch.randn(B, 1, H, D, dtype=dtype)
            kc, vc = (torch.randn(B, S, Hkv, D, dtype=dtype) for _ in range(2))
            lens = torch.full((B,), S, dtype=torch.int32)
            scale = 1.0 / math.sqrt(D)
            ours = lambda: torch.ops.fastlm.decode_attention(q, kc, vc, lens, scale)
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, kc, vc))
            ref = lambda: F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=H != Hkv)
            (t_o, b_o), (t_r, b_r) = compare([ours, ref], args.reps)
            nbytes = 2 * B * S * Hkv * D * kc.element_size()
            print(f"  {str(dtype)[6:]:8s} B={B} H={H} Hkv={Hkv} S={S:6d}  fastlm {nbytes / t_o / 1e9:5.1f} / "
                  f"{nbytes / b_o / 1e9:5.1f} GB/s ({nbytes / t_o / 1e9 / bw:4.0%} of copy)   torch sdpa "
                  f"{nbytes / t_r / 1e9:5.1f} GB/s   ratio {t_r / t_o:4.2f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", choices=["fwd", "decode"])
    ap.add_argument("--seqlens", default="256,512,1024,2048")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the calling thread's CPU time (with --threads 1: robust against a loaded machine)")
    args = ap.parse_args()
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    args.seqlens = [int(s) for s in args.seqlens.split(",")]
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.only in (None, "fwd"):
        bench_fwd(args)
    if args.only in (None, "decode"):
        bench_decode(args)


if __name__ == "__main__":
    main()
