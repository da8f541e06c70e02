"""Scratch benchmark: prefill (forward logits) of fastlm vs transformers (sdpa), same weights, alternating the two
models call by call in one process, so that drifts of a shared machine hit both alike.

    python bench/dev/prefill_ab.py [--preset llama-56m] [--seqlen 1024] [--rounds 5] [--dtype float32]

Prints each model's times, their medians and the ratio of medians (transformers time / fastlm time).
"""
import argparse
import statistics
import time

import torch

from fastlm.bench_suites import ModelCase


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-56m")
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()
    hf, fast, _ = ModelCase.models(args.preset, getattr(torch, args.dtype), "cpu")
    tokens = torch.randint(0, fast.config.vocab_size, (1, args.seqlen))
    contenders = {"fastlm": fast, "transformers": hf}
    times = {name: [] for name in contenders}
    with torch.no_grad():
        for model in contenders.values():
            model(tokens)                                            # warm-up
        for _ in range(args.rounds):
            for name, model in contenders.items():
                t = time.perf_counter()
                model(tokens)
                times[name].append(time.perf_counter() - t)
    for name, ts in times.items():
        print(f"{name:13s} " + " ".join(f"{t:.3f}" for t in ts) + f"  median {statistics.median(ts):.3f} s")
    ratio = statistics.median(times["transformers"]) / statistics.median(times["fastlm"])
    print(f"{args.preset} prefill 1x{args.seqlen} {args.dtype}: fastlm {ratio:.2f}x transformers (ratio of medians)")


if __name__ == "__main__":
    main()
