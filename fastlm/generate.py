"""Autoregressive generation with the model's static KV cache.

generate() allocates a cache of its own once (model.setup_cache: (batch, max_seqlen, n_kv_head, head_dim) per
layer; a cache the caller set up is put back afterwards, contents untouched), runs one prefill over the right-padded
prompts with the fused attention, then one-token decode steps ``model(tok, input_pos=pos)`` in which sequence b's new
token sits at position pos[b]. Right padding is safe: a sequence's pad positions lie after its last prompt token, so
the causal prefill never lets a real token see them, and decode step t overwrites position len[b] + t before anything
attends it.

The decode step (model call, sampling, position update) has no host synchronization: positions live on the device,
sampling uses the exponential-race trick instead of torch.multinomial, and finished sequences are masked on the device.
So on a GPU the step can be captured in a CUDA graph (``cuda_graph=True``: one replay per token, no kernel launch
cost) or compiled with CUDA graphs (``compile=True``). The host looks at the tokens only to check
whether every sequence has hit a stop token, every ``sync_every`` steps (default 1: one tiny device->host copy per
token, negligible next to reading the weights; raise it under CUDA graphs), and when streaming.
"""
from __future__ import annotations

import argparse
import codecs
import math
import sys
from typing import Callable, Sequence

import torch

from fastlm.config import is_int, is_real


def sample(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V): greedy for temperature 0, else softmax(logits / T) restricted to the
    top_k most likely tokens and to the smallest set whose probability reaches top_p. ``noise`` (B, V) of Exp(1)
    draws may be passed in (drawn from ``generator`` otherwise), which keeps the generator out of compiled code.
    A row whose logits hold a NaN or +inf, or are all -inf, has no distribution to draw from: ValueError (this check
    reads the result on the host)."""
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        got = f"a {logits.dtype} tensor" if isinstance(logits, torch.Tensor) else _describe(logits)
        raise TypeError(f"logits must be a floating-point tensor (batch, vocab), got {got}")
    if logits.dim() != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must have shape (batch, vocab) with vocab >= 1, got {tuple(logits.shape)}")
    _check_sampler(temperature, top_k, top_p)
    if noise is not None and (not isinstance(noise, torch.Tensor) or noise.shape != logits.shape):
        got = f"shape {tuple(noise.shape)}" if isinstance(noise, torch.Tensor) else _describe(noise)
        raise ValueError(f"noise must be None or a tensor of the logits' shape {tuple(logits.shape)}, got {got}")
    if noise is not None and not bool(((noise > 0) & (noise < math.inf)).all()):
        raise ValueError("noise must hold positive finite Exp(1) draws (exponential_noise), got a value <= 0, inf or "
                         "NaN: it would bias the draw")
    out = _sample(logits, float(temperature), None if top_k is None else int(top_k),
                  None if top_p is None else float(top_p), generator, noise)
    bad = (out < 0).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"logits rows {bad[:8]} hold a NaN or +inf, or are all -inf: no token can be drawn")
    return out


def _sample(logits, temperature, top_k, top_p, generator=None, noise=None):
    """sample() without the argument checks (generate() checks them once, not at every step) and without reading
    anything on the host: a row with no distribution to draw from (a NaN or +inf logit, or all -inf) gets -1."""
    valid = torch.isfinite(logits.amax(dim=-1))      # (amax propagates NaN)
    return torch.where(valid, _draw(logits, temperature, top_k, top_p, generator, noise), -1)


def _draw(logits, temperature, top_k, top_p, generator, noise):
    if temperature == 0:
        return logits.argmax(dim=-1)
    # (logits - max) <= 0 over a temperature of at least float32's smallest normal (a smaller one would round to 0
    # and give 0 / 0 at the maximum; below that bound every token but the most likely ones gets probability 0
    # either way, as greedy decoding would): never a NaN
    logits = logits.float()
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(temperature, torch.finfo(torch.float32).tiny)
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



def _describe(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def check_sampling(max_new_tokens, temperature, top_k, top_p):
    """The sampling arguments' checks, shared with the CLI (which runs them before loading a checkpoint)."""
    if not is_int(max_new_tokens):
        raise TypeError(f"max_new_tokens must be an int >= 0, got {_describe(max_new_tokens)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampler(temperature, top_k, top_p)


def _check_sampler(temperature, top_k, top_p):
    if not is_real(temperature):
        raise TypeError(f"temperature must be a number >= 0 (0 = greedy), got {_describe(temperature)}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be >= 0 (0 = greedy) and finite, got {temperature!r}")
    if top_k is not None and not is_int(top_k):
        raise TypeError(f"top_k must be a positive int or None, got {_describe(top_k)}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be a positive int or None, got {top_k!r}")
    if top_p is not None and not is_real(top_p):
        raise TypeError(f"top_p must be a number in (0, 1] or None, got {_describe(top_p)}")
    if top_p is not None and not 0.0 < top_p <= 1.0:          # also rejects nan
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")


def _check_args(model, max_new_tokens, temperature, top_k, top_p, compile, cuda_graph, sync_every, pad_id, stream,
                generator, vocab_size):
    if not hasattr(model, "setup_cache"):
        raise TypeError(f"model must be a fastlm.Transformer (with setup_cache), got {type(model).__name__}")
    if vocab_size is not None and not is_int(vocab_size):
        raise TypeError(f"vocab_size must be an int or None, got {_describe(vocab_size)}")
    if vocab_size is not None and not 1 <= vocab_size <= model.config.vocab_size:
        raise ValueError(f"vocab_size must be in [1, {model.config.vocab_size}] (the model's vocab_size), got "
                         f"{vocab_size!r}")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {_describe(generator)}")
        device, where = next(model.parameters()).device, generator.device
        same = where.type == device.type and None in (where.index, device.index) or where == device
        if temperature != 0 and not same:  # (greedy decoding draws nothing from it)
            raise ValueError(f"generator must be on the model's device ({device}), got a generator on {where}")
    check_sampling(max_new_tokens, temperature, top_k, top_p)
    if not isinstance(compile, (bool, str)):
        raise TypeError(f"compile must be a bool or the name of a torch.compile backend, got {_describe(compile)}")
    if isinstance(compile, str):
        known = torch.compiler.list_backends(exclude_tags=())
        if compile not in known:
            raise ValueError(f"compile must be a bool or the name of a torch.compile backend, got {compile!r}; "
                             f"backends here: {', '.join(known)}")
    if not isinstance(cuda_graph, bool):
        raise TypeError(f"cuda_graph must be a bool, got {_describe(cuda_graph)}")
    if cuda_graph:
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"cuda_graph=True needs the model on a CUDA device, got {device}")
        if compile:
            raise ValueError("cuda_graph=True and compile are exclusive (compile=True captures CUDA graphs itself)")
    if not is_int(sync_every):
        raise TypeError(f"sync_every must be a positive int, got {_describe(sync_every)}")
    if sync_every < 1:
        raise ValueError(f"sync_every must be a positive int, got {sync_every!r}")
    if pad_id is not None and not is_int(pad_id):
        raise TypeError(f"pad_id must be an int or None, got {_describe(pad_id)}")
    if pad_id is not None and not -2 ** 63 <= pad_id < 2 ** 63:
        raise ValueError(f"pad_id must fit in int64, got {pad_id!r}")
    if stream is not None and not callable(stream):
        raise TypeError(f"stream must be a callable or None, got {_describe(stream)}")


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def _token_list(row, what: str) -> list[int]:
    """A sequence of token ids (list, tuple, 1-D integer tensor or array) as a list of Python ints."""
    if isinstance(row, torch.Tensor):
        if row.dim() != 1 or row.dtype not in _INT_DTYPES:
            raise TypeError(f"{what} must be a 1-D integer tensor or a list of ints, got a {row.dtype} tensor of "
                            f"shape {tuple(row.shape)}")
        return row.tolist()
    if isinstance(row, (str, bytes)) or not hasattr(row, "__iter__") or isinstance(row, (set, frozenset, dict)):
        raise TypeError(f"{what} must be a list of token ids (ints), got {_describe(row)}")
    ids = list(row)
    for i, t in enumerate(ids):
        if not is_int(t):
            raise TypeError(f"{what} must hold token ids (ints), got {_describe(t)} at index {i}")
    return [int(t) for t in ids]


def _pad_prompts(prompts, vocab_size: int, device):
    """(tokens (B, S) right-padded with 0, lengths (B,) on device, host lengths, the input's form: "tensor",
    "tensor1d" (one prompt as a 1-D tensor), "list" or "flat" (one prompt as a list of ints))."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() not in (1, 2) or prompts.dtype not in _INT_DTYPES:
            raise ValueError(f"prompts must be an integer tensor of shape (batch, seqlen) or a list of token lists, "
                             f"got a {prompts.dtype} tensor of shape {tuple(prompts.shape)}")
        form = "tensor" if prompts.dim() == 2 else "tensor1d"
        rows = [r.tolist() for r in prompts] if prompts.dim() == 2 else [prompts.tolist()]
    elif isinstance(prompts, (str, bytes)):
        raise TypeError(f"prompts must be token ids (a list of token lists or an integer tensor), got "
                        f"{type(prompts).__name__} {prompts[:20]!r}; encode text with a tokenizer first")
    elif not isinstance(prompts, Sequence) and not hasattr(prompts, "__array__"):
        raise TypeError(f"prompts must be a list of token lists or an integer tensor (batch, seqlen), got "
                        f"{type(prompts).__name__}")
    else:
        if getattr(prompts, "ndim", 1) not in (1, 2):                   # (an array: one prompt, or a batch)
            raise ValueError(f"prompts must be a list of token lists or an integer array of shape (batch, seqlen), "
                             f"got an array of shape {tuple(prompts.shape)}")
        prompts = list(prompts)
        if prompts and is_int(prompts[0]):                             # one prompt as a flat list of ids
            form, rows = "flat", [_token_list(prompts, "prompts (one prompt as a flat list of token ids)")]
        else:
            form = "list"
            rows = [_token_list(p, f"prompts[{b}]") for b, p in enumerate(prompts)]
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
    return tokens.to(device), torch.tensor(lengths, dtype=torch.long, device=device), lengths, form


def _stop_list(stop_tokens, vocab_size: int) -> list[int]:
    if stop_tokens is None:
        return []
    if is_int(stop_tokens) or (isinstance(stop_tokens, torch.Tensor) and stop_tokens.dim() == 0
                                and stop_tokens.dtype in _INT_DTYPES):
        raise TypeError(f"stop_tokens must be a list of token ids, got the single value {stop_tokens!r}; "
                        f"pass [{int(stop_tokens)}] for one stop token")
    if isinstance(stop_tokens, (set, frozenset)):
        raise TypeError("stop_tokens must be an ordered list, tuple or 1-D integer tensor of token ids (the first "
                        f"is the default pad_id), got a {type(stop_tokens).__name__}")
    stop = _token_list(stop_tokens, "stop_tokens")
    bad = [t for t in stop if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"stop_tokens: token ids must be in [0, {vocab_size}) (the model's vocab), got {bad[0]!r}")
    return stop


def _decode_step(model, tok, pos, done, stop, temperature, top_k, top_p, noise, n_vocab):
    """One token for every sequence: tok (B,) at positions pos (B,), drawn from ids [0, n_vocab); noise (B, n_vocab)
    for sampling (None for greedy).
    Returns the next tokens (B,) and the updated done mask. A finished sequence goes on sampling (its tokens are
    replaced by the pad in the output, never fed to the model, so any pad id works). Device-only work: nothing here
    reads a value on the host. (A token of -1, from logits with nothing to draw from, is fed as 0: generate raises
    once it sees it on the host.)"""
    logits = model(tok.clamp(min=0)[:, None], input_pos=pos)[:, -1, :n_vocab]            # (B, n_vocab)
    nxt = _sample(logits, temperature, top_k, top_p, noise=noise)
    if stop is not None:
        done = done | _is_stop(nxt, stop)
    return nxt, done


def _is_stop(tok, stop):
    """tok (B,) in stop (n,), elementwise (torch.isin sorts, and synchronizes with the host, from about 10 stop
    tokens on)."""
    return (tok[:, None] == stop).any(-1)


class _GraphedStep:
    """step(tok, pos, done, noise) -> (tok, done) captured in a CUDA graph: its tensor arguments are copied into
    static buffers before each replay and its results copied out, so that the caller sees an ordinary call. The
    step is run once on a side stream before the capture (kernel autotuning and lazy initialization must not happen
    in it); a decode step is idempotent (it writes the same cache rows and returns the same tokens for the same
    arguments), so that run is harmless."""

    def __init__(self, step, tok, pos, done, noise):
        self.inputs = [None if t is None else t.clone() for t in (tok, pos, done, noise)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.outputs = step(*self.inputs)

    def __call__(self, *inputs):
        for buf, t in zip(self.inputs, inputs):
            if t is not None:
                buf.copy_(t)
        self.graph.replay()
        return tuple(t.clone() for t in self.outputs)


@torch.no_grad()
def generate(model, prompts, max_new_tokens: int, *, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens: Sequence[int] | None = (),
             generator: torch.Generator | None = None, compile: bool | str = False, cuda_graph: bool = False,
             sync_every: int = 1, pad_id: int | None = None,
             stream: Callable[[torch.Tensor], None] | None = None, vocab_size: int | None = None):
    """Generate up to ``max_new_tokens`` tokens after each prompt.

    prompts: a LongTensor (B, S), or a list of token lists of different lengths; one prompt may also be given as a
    flat list of ints or a 1-D tensor. Returns the prompt followed by its new tokens, in the input's form: a
    LongTensor (B, S + n) for tensor input (n = the number of steps run; after its stop token a sequence is filled
    with ``pad_id``, default the first stop token; any int64, it is never fed to the model), or a list of token
    lists ending at (and including) the stop token (a 1-D tensor or a flat list for a single prompt given so).
    ``stop_tokens`` is a list of token ids (None or empty: none). ``generator`` (a seeded torch.Generator on the
    model's device) makes sampling reproducible. ``vocab_size`` (default: the model's) limits the new tokens to ids
    below it, for a model whose embedding and LM head are padded past its tokenizer's vocabulary.
    ``stream(tokens)`` is called after every step with the new tokens (B,) on the CPU.
    ``compile=True`` compiles the decode step with torch.compile (CUDA graphs on GPU); a string picks the
    torch.compile backend instead (e.g. "aot_eager"). ``cuda_graph=True`` (CUDA only) captures the decode step, as
    it is, in a CUDA graph after its first run, and replays it for every later token.
    """
    _check_args(model, max_new_tokens, temperature, top_k, top_p, compile, cuda_graph, sync_every, pad_id, stream,
                generator, vocab_size)
    max_new_tokens, temperature, sync_every = int(max_new_tokens), float(temperature), int(sync_every)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    cfg = model.config
    n_vocab = cfg.vocab_size if vocab_size is None else int(vocab_size)  # ids sampled: [0, n_vocab)
    param = next(model.parameters())
    device = param.device
    tokens, lengths, host_lengths, form = _pad_prompts(prompts, cfg.vocab_size, device)
    B, S = tokens.shape
    longest = max(host_lengths)
    if longest + max_new_tokens > cfg.max_seqlen:
        raise ValueError(f"prompt of {longest} tokens + max_new_tokens={max_new_tokens} exceeds the model's context "
                         f"(max_seqlen={cfg.max_seqlen})")
    stop_tokens = _stop_list(stop_tokens, cfg.vocab_size)
    stop = torch.tensor(stop_tokens, dtype=torch.long, device=device) if stop_tokens else None
    if pad_id is None:
        pad_id = stop_tokens[0] if stop_tokens else 0

    decode = _decode_step
    if compile:
        # not fullgraph: the step traces as one graph on every backend (test_decode_step_compiles_as_one_graph), but
        # a graph break in some other model should cost speed, not the run
        options = {"backend": compile} if isinstance(compile, str) else {
            "mode": "reduce-overhead" if device.type == "cuda" else None}
        decode = torch.compile(_decode_step, **options)

    def step(tok, pos, done, noise):
        return decode(model, tok, pos, done, stop, temperature, top_k, top_p, noise, n_vocab)

    # generate runs on a cache of its own and leaves the model's as it found it (a cache set up by the caller, with
    # its contents, or none), in the dtype the model computes in (the autocast dtype under torch.autocast).
    caller_cache = model._cache_state()
    try:
        model.setup_cache(B, longest + max_new_tokens, device=device)
        out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        drawless = torch.zeros(B, max_new_tokens, dtype=torch.bool, device=device)  # see _sample's -1
        n = 0
        if max_new_tokens > 0:
            last = model(tokens, logits_at=(lengths - 1)[:, None])[:, 0, :n_vocab]  # prefill, at the last tokens
            tok = _sample(last, temperature, top_k, top_p, generator)
            done = _is_stop(tok, stop) if stop is not None else torch.zeros(B, dtype=torch.bool, device=device)
            out[:, 0] = tok
            drawless[:, 0] = tok < 0
            n = 1
            if stream is not None:
                _raise_if_drawless(drawless[:, :1].cpu(), 0)
                stream(tok.cpu())
            pos = lengths.clone()
            while n < max_new_tokens:
                if stop is not None and (n % sync_every == 0) and bool(done.all()):
                    break
                if compile and device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs were consumed
                noise = exponential_noise((B, n_vocab), device, generator) if temperature > 0 else None
                if cuda_graph and not isinstance(step, _GraphedStep):
                    step = _GraphedStep(step, tok, pos, done, noise)
                finished = done
                tok, done = step(tok, pos, done, noise)
                if compile and device.type == "cuda":
                    # a CUDA-graph replay's outputs are overwritten by the next replay: keep copies (the next step
                    # reads them, and `finished` above must outlive that replay)
                    tok, done = tok.clone(), done.clone()
                out[:, n] = torch.where(finished, pad_id, tok)
                drawless[:, n] = (tok < 0) & ~finished
                pos += 1
                n += 1
                if stream is not None:
                    _raise_if_drawless(drawless[:, n - 1:n].cpu(), n - 1)
                    stream(out[:, n - 1].cpu())
        _raise_if_drawless(drawless[:, :n].cpu(), 0)
        new = out[:, :n].cpu()
    finally:
        model._set_cache_state(caller_cache)
    return _assemble(tokens.cpu(), host_lengths, new, stop_tokens, form)


def _raise_if_drawless(drawless, first):
    """drawless (B, n), on the host: which new tokens from ``first`` on came from logits with nothing to draw from
    (_sample's -1) in a sequence still running."""
    bad = drawless.nonzero().tolist()
    if bad:
        b, i = bad[0]
        raise RuntimeError(f"generate: the model's logits for sequence {b} at new token {first + i} hold a NaN or "
                           f"+inf, or are all -inf: no token can be drawn (are its weights finite, and its "
                           f"activations within its dtype's range?)")


def _assemble(tokens, lengths, new, stop_tokens, form):
    if form in ("tensor", "tensor1d"):
        out = torch.cat([tokens, new], dim=1)
        return out if form == "tensor" else out[0]
    stops = set(int(t) for t in stop_tokens)
    result = []
    for b, L in enumerate(lengths):
        seq = tokens[b, :L].tolist()
        for t in new[b].tolist():
            seq.append(t)
            if t in stops:
                break
        result.append(seq)
    return result[0] if form == "flat" else result


DEFAULT_NEW_TOKENS = 200     # the CLI's --max-new-tokens when the model's context leaves room for them


def cli(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastlm generate",
                                     description="Generate text from a checkpoint written by `python -m fastlm train`.")
    parser.add_argument("prompt", nargs="?", default="", help="the prompt text (default: empty = a newline)")
    parser.add_argument("--checkpoint", required=True,
                        help="training output directory (holding checkpoint.safetensors) or a .safetensors file")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"tokens to generate (default: {DEFAULT_NEW_TOKENS}, or as many as the model's context "
                             f"leaves after the prompt)")
    parser.add_argument("--temperature", type=float, default=0.8, help="(default: 0.8; 0 = greedy)")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=0.95, help="(default: 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (any integer; reduced modulo 2**64)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable; one token each)")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA graphs on GPU)")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="capture the decode step in a CUDA graph (CUDA only; no compilation)")
    args = parser.parse_args(argv)
    from fastlm.train import load_checkpoint, resolve_device, seed64
    try:
        _check_cli_args(args)
        device = resolve_device(args.device, what="--device")
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        _check_backend(args.backend, device, dtype, args.dtype)
        if args.cuda_graph and args.compile:
            raise ValueError("--cuda-graph and --compile are exclusive (--compile captures CUDA graphs itself)")
        if args.cuda_graph and device.type != "cuda":
            raise ValueError(f"--cuda-graph needs a CUDA device, got {device} (--device)")
        model, info = load_checkpoint(args.checkpoint, backend=args.backend, device=device)
        model = model.to(dtype).eval()
        tokenizer = info["tokenizer"]
        ids = _encode(tokenizer, args.prompt or "\n", "the prompt")
        stop = []
        for s in args.stop:
            enc = _encode(tokenizer, s, f"--stop {s!r}")
            if len(enc) != 1:
                raise ValueError(f"--stop {s!r} is {len(enc)} tokens; a stop string must be exactly one token")
            stop.append(enc[0])
        budget = model.config.max_seqlen - len(ids)
        if budget < 0:
            raise ValueError(f"the prompt is {len(ids)} tokens, longer than the model's context "
                             f"(max_seqlen={model.config.max_seqlen})")
        if args.max_new_tokens is None:
            if budget == 0:
                raise ValueError(f"the prompt is {len(ids)} tokens, the whole of the model's context "
                                 f"(max_seqlen={model.config.max_seqlen}): no room for new tokens")
            max_new = min(DEFAULT_NEW_TOKENS, budget)
        elif args.max_new_tokens > budget:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens} does not fit: the prompt is {len(ids)} tokens "
                             f"of the model's context max_seqlen={model.config.max_seqlen}, which leaves {budget}")
        else:
            max_new = args.max_new_tokens
        gen = torch.Generator(device=device).manual_seed(seed64(args.seed))
        stream = _Streamer(tokenizer, ids)
        sys.stdout.write(args.prompt)
        # (a model trained with a padded vocab_size: only the tokenizer's ids are sampled)
        generate(model, [ids], max_new, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                 stop_tokens=stop, generator=gen, compile=args.compile, cuda_graph=args.cuda_graph, stream=stream,
                 vocab_size=min(tokenizer.vocab_size, model.config.vocab_size))
        stream.flush()
        sys.stdout.write("\n")
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _encode(tokenizer, text, what):
    try:
        return tokenizer.encode(text)
    except UnicodeError as e:  # (command-line bytes that are not UTF-8 arrive as lone surrogates)
        raise ValueError(f"{what} is not valid UTF-8 text: {e}") from None


def _check_cli_args(args):
    """The sampling options, checked before the checkpoint is loaded and under their option names."""
    try:
        check_sampling(DEFAULT_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens, args.temperature,
                       args.top_k, args.top_p)
    except (TypeError, ValueError) as e:
        for name in ("max_new_tokens", "temperature", "top_k", "top_p"):
            if str(e).startswith(name):
                raise ValueError("--" + name.replace("_", "-") + str(e)[len(name):]) from None
        raise


def _check_backend(backend: str, device: torch.device, dtype: torch.dtype, dtype_name: str):
    """--backend checked against the device and --dtype: the model's attention must be able to run there."""
    from fastlm.backends import resolve
    try:
        resolve(backend, device, "the model's attention", native_ops=("attention_fwd", "decode_attention"),
                dtype=dtype)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"--backend {backend} on device {device} with --dtype {dtype_name}: {e}") from None


class _Streamer:
    """Prints tokens as they arrive. Byte-level tokens may split a UTF-8 character, so bytes go through an
    incremental decoder. Other tokenizers decode a token's text in context (SentencePiece drops a lone piece's
    leading space; a BPE token may hold part of a character): the prompt and the new ids are decoded together and
    the text past what was printed is written, held back while it ends in an incomplete character."""

    def __init__(self, tokenizer, prompt_ids=()):
        self.tokenizer = tokenizer
        self.byte_level = getattr(tokenizer, "byte_level", False)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.ids = [int(i) for i in prompt_ids]
        self.printed = len(tokenizer.decode(self.ids)) if not self.byte_level else 0

    def __call__(self, tok: torch.Tensor):
        t = int(tok[0])
        if self.byte_level:
            self._write(self.decoder.decode(bytes([t])))
            return
        self.ids.append(t)
        text = self.tokenizer.decode(self.ids)
        if not text.endswith("\ufffd"):
            self._write(text[self.printed:])
            self.printed = len(text)

    @staticmethod
    def _write(text):
        sys.stdout.write(text)
        sys.stdout.flush()

    def flush(self):
        if self.byte_level:
            sys.stdout.write(self.decoder.decode(b"", final=True))
        elif self.ids:
            sys.stdout.write(self.tokenizer.decode(self.ids)[self.printed:])
        sys.stdout.flush()
