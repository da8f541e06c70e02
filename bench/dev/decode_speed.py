"""Scratch benchmark: batch-1 greedy decode tokens/s of fastlm.generate vs transformers' generate, same weights,
same run. Default: the llama-56m shape in fp32 on the CPU (the target: >= 1.6x transformers, >= 80% of the
weight-bandwidth roofline = measured copy bandwidth / weight bytes).

    python bench/dev/decode_speed.py [--preset llama-56m] [--prompt 16] [--new 64] [--repeats 3] [--threads N]
                                     [--cpu-time]

Prints one line per contender (median of --repeats) and checks that both produce the same greedy tokens.
"""
import argparse
import statistics
import time

import torch


def copy_bandwidth(nbytes=512 << 20, repeats=5):
    """Bytes moved per second (read + write) by a large tensor copy: the memory ceiling measured in this run."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).uniform_()
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def timed(fn, repeats, clock=time.perf_counter):
    times, out = [], None
    for _ in range(repeats):
        t = clock()
        out = fn()
        times.append(clock() - t)
    return statistics.median(times), out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="llama-56m")
    p.add_argument("--prompt", type=int, default=16)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--backends", default="auto,torch")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with the process CPU clock (with --threads 1: the single-core time even when other jobs "
                        "share the machine)")
    args = p.parse_args()
    clock = time.process_time if args.cpu_time else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    import fastlm
    from fastlm.config import Config

    cfg = Config.from_name(args.preset)
    hf_cfg = transformers.LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model,
                                      intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.n_layer,
                                      num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                                      max_position_embeddings=cfg.max_seqlen, rms_norm_eps=cfg.norm_eps,
                                      rope_theta=cfg.rope_base, tie_word_embeddings=cfg.tie_embeddings)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    weight_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    bw = copy_bandwidth()
    roofline = bw / weight_bytes
    print(f"{args.preset}: {weight_bytes / 2**20:.0f} MiB of fp32 weights; copy bandwidth {bw / 1e9:.1f} GB/s -> "
          f"roofline {roofline:.1f} tok/s; threads {torch.get_num_threads()}; prompt {args.prompt}, new {args.new}")

    def run_hf():
        with torch.no_grad():
            return hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.new,
                               min_new_tokens=args.new, do_sample=False, pad_token_id=0)

    run_hf()  # warm-up
    t_hf, out_hf = timed(run_hf, args.repeats, clock)
    hf_rate = args.new / t_hf
    print(f"  transformers generate      {hf_rate:7.1f} tok/s  ({hf_rate / roofline:.0%} of roofline)")
    for backend in args.backends.split(","):
        model = fastlm.from_hf(hf, backend=backend).eval()

        def run_fastlm():
            return model.generate(prompt, args.new)

        run_fastlm()
        t, out = timed(run_fastlm, args.repeats, clock)
        rate = args.new / t
        same = torch.equal(out, out_hf[:, :out.shape[1]])
        print(f"  fastlm generate ({backend:<6})  {rate:7.1f} tok/s  ({rate / roofline:.0%} of roofline, "
              f"{rate / hf_rate:.2f}x transformers; tokens {'identical' if same else 'DIFFER'})")


if __name__ == "__main__":
    main()
