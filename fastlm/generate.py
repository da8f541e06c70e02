"""Autoregressive generation with the model's static KV cache.

generate() allocates the cache once (model.setup_cache: (batch, max_seqlen, n_kv_head, head_dim) per layer), runs
one prefill over the right-padded prompts with the fused attention, then one-token decode steps
``model(tok, input_pos=pos)`` in which sequence b's new token sits at position pos[b]. Right padding is safe: a
sequence's pad positions lie after its last prompt token, so the causal prefill never lets a real token see them, and
decode step t overwrites position len[b] + t before anything attends it.

The decode step (model call, sampling, position update) has no host synchronization: positions live on the device,
sampling uses the exponential-race trick instead of torch.multinomial, and finished sequences are masked on the device.
So on a GPU the step can be compiled with CUDA graphs (``compile=True``). The host looks at the tokens only to check
whether every sequence has hit a stop token, every ``sync_every`` steps (default 1: one tiny device->host copy per
token, negligible next to reading the weights; raise it under CUDA graphs), and when streaming.
"""
from __future__ import annotations

import argparse
import codecs
import sys
from typing import Callable, Sequence

import torch


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy for temperature 0, else softmax(logits / T) restricted to the
    top_k most likely tokens and to the smallest set whose probability reaches top_p. ``noise`` (B, V) of Exp(1)
    draws may be passed in (drawn from ``generator`` otherwise), which keeps the generator out of compiled code."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the most likely one always stays)
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    # argmax(p / E) with E ~ Exp(1) draws from p, with no host sync (torch.multinomial may sync)
    if noise is None:
        noise = exponential_noise(probs.shape, probs.device, generator)
    return (probs / noise).argmax(dim=-1)


def exponential_noise(shape, device, generator=None) -> torch.Tensor:
    return torch.empty(shape, dtype=torch.float32, device=device).exponential_(1.0, generator=generator)


def _check_args(model, max_new_tokens, temperature, top_k, top_p, sync_every):
    if not hasattr(model, "setup_cache"):
        raise TypeError(f"model must be a fastlm.Transformer (with setup_cache), got {type(model).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if not isinstance(sync_every, int) or sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")


def _pad_prompts(prompts, vocab_size: int, device):
    """(tokens (B, S) right-padded with 0, lengths (B,) on device, host lengths, whether the input was a tensor)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2 or prompts.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"prompts must be an integer tensor of shape (batch, seqlen) or a list of token lists, "
                             f"got a {prompts.dtype} tensor of shape {tuple(prompts.shape)}")
        rows = [prompts[b].tolist() for b in range(prompts.shape[0])]
        is_tensor = True
    else:
        rows = [list(map(int, p)) for p in prompts]
        is_tensor = False
    if not rows:
        raise ValueError("prompts is empty: need at least one prompt")
    lengths = [len(r) for r in rows]
    if min(lengths) == 0:
        raise ValueError(f"every prompt needs at least one token; prompt {lengths.index(0)} is empty")
    flat = [t for r in rows for t in r]
    if min(flat) < 0 or max(flat) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size}), got ids in [{min(flat)}, {max(flat)}]")
    S = max(lengths)
    tokens = torch.zeros(len(rows), S, dtype=torch.long)
    for b, r in enumerate(rows):
        tokens[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return tokens.to(device), torch.tensor(lengths, dtype=torch.long, device=device), lengths, is_tensor


def _decode_step(model, tok, pos, done, stop, pad_id, temperature, top_k, top_p, noise):
    """One token for every sequence: tok (B,) at positions pos (B,); noise (B, V) for sampling (None for greedy).
    Returns the next tokens (B,) and the updated done mask. Device-only work: nothing here reads a value on the
    host."""
    logits = model(tok[:, None], input_pos=pos)[:, -1]                      # (B, V)
    nxt = sample(logits, temperature, top_k, top_p, noise=noise)
    nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
    if stop is not None:
        done = done | torch.isin(nxt, stop)
    return nxt, done


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens: Sequence[int] = (), generator: torch.Generator | None = None,
             compile: bool | str = False, sync_every: int = 1, pad_id: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None):
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    prompts: a LongTensor (B, S), or a list of token lists of different lengths. Returns the prompt followed by its
    new tokens: a LongTensor (B, S + n) for tensor input (n = the number of steps run; after its stop token a
    sequence is filled with ``pad_id``, default the first stop token), or a list of token lists ending at (and
    including) the stop token. ``generator`` (a seeded torch.Generator on the model's device) makes sampling
    reproducible. ``stream(tokens)`` is called after every step with the new tokens (B,) on the CPU.
    ``compile=True`` compiles the decode step with torch.compile (CUDA graphs on GPU); a string picks the
    torch.compile backend instead (e.g. "aot_eager").
    """
    _check_args(model, max_new_tokens, temperature, top_k, top_p, sync_every)
    cfg = model.config
    param = next(model.parameters())
    device = param.device
    tokens, lengths, host_lengths, is_tensor = _pad_prompts(prompts, cfg.vocab_size, device)
    B, S = tokens.shape
    longest = max(host_lengths)
    if longest + max_new_tokens > cfg.max_seqlen:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"(max_seqlen={cfg.max_seqlen})")
    stop = torch.tensor(list(stop_tokens), dtype=torch.long, device=device) if len(stop_tokens) else None
    if pad_id is None:
        pad_id = int(stop_tokens[0]) if len(stop_tokens) else 0

    step = _decode_step
    if compile:
        # not fullgraph: the "torch" backend's reference decode attention reads cache lengths on the host and
        # breaks the graph there; the kernel backends compile into one graph
        options = {"backend": compile} if isinstance(compile, str) else {
            "mode": "reduce-overhead" if device.type == "cuda" else None}
        step = torch.compile(_decode_step, **options)
    # the cache dtype follows the weights: under autocast the cache would have to be set up by the caller
    model.setup_cache(B, longest + max_new_tokens, dtype=param.dtype, device=device)
    try:
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        n = 0
        if max_new_tokens > 0:
            last = model(tokens, logits_at=(lengths - 1)[:, None])[:, 0]       # prefill: (B, V) at each last token
            tok = sample(last, temperature, top_k, top_p, generator)
            done = torch.isin(tok, stop) if stop is not None else torch.zeros(B, dtype=torch.bool, device=device)
            out[:, 0] = tok
            n = 1
            if stream is not None:
                stream(tok.cpu())
            pos = lengths.clone()
            while n < max_new_tokens:
                if stop is not None and (n % sync_every == 0) and bool(done.all()):
                    break
                if compile and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were consumed
                noise = exponential_noise((B, cfg.vocab_size), device, generator) if temperature > 0 else None
                tok, done = step(model, tok, pos, done, stop, pad_id, temperature, top_k, top_p, noise)
                out[:, n] = tok
                pos += 1
                n += 1
                if stream is not None:
                    stream(tok.cpu())
        new = out[:, :n].cpu()
    finally:
        model.clear_cache()
    return _assemble(tokens.cpu(), host_lengths, new, stop_tokens, is_tensor)


def _assemble(tokens, lengths, new, stop_tokens, is_tensor):
    if is_tensor:
        return torch.cat([tokens, new], dim=1)
    stops = set(int(t) for t in stop_tokens)
    result = []
    for b, L in enumerate(lengths):
        seq = tokens[b, :L].tolist()
        for t in new[b].tolist():
            seq.append(t)
            if t in stops:
                break
        result.append(seq)
    return result


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm generate",
                                     description="Generate text from a checkpoint written by `python -m fastlm train`.")
    parser.add_argument("prompt", nargs="?", default="", help="the prompt text (default: empty = a newline)")
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or training output directory")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; one token each)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    args = parser.parse_args(argv)
    from fastlm.train import load_checkpoint
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        model, info = load_checkpoint(args.checkpoint, backend=args.backend, device=device)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        model = model.to(dtype).eval()
        tokenizer = info["tokenizer"]
        ids = tokenizer.encode(args.prompt or "\n")
        stop = []
        for s in args.stop:
            enc = tokenizer.encode(s)
            if len(enc) != 1:
                raise ValueError(f"--stop {s!r} is {len(enc)} tokens; a stop string must be exactly one token")
            stop.append(enc[0])
        budget = model.config.max_seqlen - len(ids)
        if budget < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context "
                             f"(max_seqlen={model.config.max_seqlen})")
        max_new = min(args.max_new_tokens, budget)
        gen = torch.Generator(device=device).manual_seed(args.seed)
        stream = _Streamer(tokenizer)
        sys.stdout.write(args.prompt)
        generate(model, [ids], max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 stop_tokens=stop, generator=gen, compile=args.compile, stream=stream)
        stream.flush()
        sys.stdout.write("\n")
    except (ValueError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


class _Streamer:
    """Prints tokens as they arrive; byte-level tokens may split a UTF-8 character, so bytes go through an
    incremental decoder."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.byte_level = getattr(tokenizer, "byte_level", False)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tok: torch.Tensor):
        t = int(tok[0])
        text = self.decoder.decode(bytes([t])) if self.byte_level else self.tokenizer.decode([t])
        sys.stdout.write(text)
        sys.stdout.flush()

    def flush(self):
        if self.byte_level:
            sys.stdout.write(self.decoder.decode(b"", final=True))
        sys.stdout.flush()
