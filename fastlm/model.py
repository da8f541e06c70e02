"""fastlm.Transformer: the decoder-only model of a fastlm.Config, built only on fastlm.ops.

Activations stay in (batch, seqlen, heads, headdim) layout, so attention needs no transposes. The residual stream is
fused into the ops: each block computes

    y = norm(h);  a = attention(y);  (y, h) = add_norm(a, h);  h = mlp(y) + h

with the residual add of the norm and of the MLP done inside the kernels. Training (``targets`` given) ends in
ops.linear_cross_entropy, so the (tokens x vocab) logits are never materialized.

Parameter names and shapes equal fastlm.reference.Transformer's: a state dict loads into either model.

Under torch.autocast the whole forward runs in the autocast dtype (the embedding output is cast to it, every weight
as an op takes it, and autocast is off inside): fastlm's ops take operands of one dtype, where autocast would cast
only the torch ops among them, and some of those to fp32. The parameters stay in their dtype (fp32 master weights)
and receive their gradients in it.

Generation: ``setup_cache`` allocates a static KV cache per layer, (B, max_seqlen, n_kv_head, head_dim), updated in
place. ``model(tokens)`` with a cache prefills from position 0; ``model(tokens, input_pos=pos)`` places token t of
sequence b at position pos[b] + t, writes its keys and values there with index ops and attends through
ops.decode_attention. The decode step reads nothing back to the host, so it can be compiled or captured in a graph.
On the CPU backend, with autograd off, a decode step is one call of ops.decode_step (the same C++ kernels in the same
order, without the per-op Python cost that dominates a small model's step); ``model.fused_decode = False`` turns
that off, and so do a hook (of its own or global) or a forward of its own on any module the step would otherwise
call (the blocks, their attention, MLP and norms, the final norm, the embeddings), wrapped blocks, parametrized
Linear layers and norms of different eps.

The nn.Linear layers hold weights that the fused ops read (through the weight attribute, so a parametrization
applies); they are never called. A Linear that would compute something else when called (an adapter class around
it such as a LoRA layer, pruning, a hook, a forward set on it) makes forward raise instead of silently computing
without it; the blocks, their attention, MLP and norm modules are called, so hooks on them run.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastlm import ops
from fastlm.backends import BACKENDS
from fastlm.config import Config, is_int
from fastlm.ops.decode import decode_step_backend
from fastlm.reference import init_weights


class _Backends(NamedTuple):
    native: str        # attention, decode_attention, mlp_*: the ops the C++ extension implements (csrc/bindings.cpp)
    generic: str       # norms, RoPE, linear, cross-entropy: "auto" for a C++ backend (the CPU has a linear kernel)


_LINEARS = ("wq", "wk", "wv", "wo", "w_fc", "w_proj", "w_gate", "w_up", "w_down", "lm_head")


def _hooked(module) -> bool:
    """Whether a hook is registered on ``module`` (its own dicts: a decode step asks for every module)."""
    d = module.__dict__
    return bool(d["_forward_hooks"] or d["_forward_pre_hooks"] or d["_backward_hooks"] or d["_backward_pre_hooks"])


def _global_hooks() -> bool:
    """Whether a hook is registered on every module (nn.modules.module's global hooks)."""
    m = nn.modules.module
    return bool(m._global_forward_hooks or m._global_forward_pre_hooks or m._global_backward_hooks
                or m._global_backward_pre_hooks)


def _calls_its_class(module, cls) -> bool:
    """Whether calling ``module`` runs cls.forward and nothing else: its class is cls, no forward set on the instance
    (e.g. an offloading hook), no hooks of its own."""
    return type(module) is cls and "forward" not in module.__dict__ and not _hooked(module)


def unwrapped(model: nn.Module) -> nn.Module:
    """The module inside torch.compile's and DistributedDataParallel's wrappers (whose state dicts prefix every
    name with _orig_mod. / module.)."""
    while True:
        if isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def effective_state_dict(model: nn.Module) -> dict:
    """model's state dict with each parametrized tensor (torch.nn.utils.parametrize: weight norm, ...) as the value
    it computes, under its plain name, in place of the parametrization's own entries."""
    state = dict(model.state_dict())
    for prefix, module in model.named_modules():
        if parametrize.is_parametrized(module):
            dot = f"{prefix}." if prefix else ""
            for name in module.parametrizations:
                for key in [k for k in state if k.startswith(f"{dot}parametrizations.{name}.")]:
                    del state[key]
                state[dot + name] = getattr(module, name).detach()
    return state


def plain_module(module, cls) -> bool:
    """Whether ``module`` computes exactly what its class does on its own weight: no adapter class around it (e.g.
    a LoRA layer), no parametrization, no hooks (global ones included), no forward of its own. Fused ops read such
    modules' weights instead of calling them."""
    return _calls_its_class(module, cls) and not _global_hooks()


def _like(t, x):
    """A weight or bias (or None) in the activations' dtype (under autocast they differ; the cast is differentiable)."""
    return t if t is None or t.dtype == x.dtype else t.to(x.dtype)


class Norm(nn.Module):
    """LayerNorm (gpt2) or RMSNorm (llama) with the residual add available fused (``add``)."""

    def __init__(self, config: Config):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = nn.Parameter(torch.ones(config.d_model))
        self.bias = nn.Parameter(torch.zeros(config.d_model)) if config.family == "gpt2" else None

    def forward(self, x, backend):
        if self.bias is not None:
            return ops.layer_norm(x, _like(self.weight, x), _like(self.bias, x), self.eps, backend=backend.generic)
        return ops.rms_norm(x, _like(self.weight, x), self.eps, backend=backend.generic)

    def add(self, x, residual, backend):
        """(norm(x + residual), x + residual)"""
        if self.bias is not None:
            return ops.add_layer_norm(x, residual, _like(self.weight, x), _like(self.bias, x), self.eps,
                                      backend=backend.generic)
        return ops.add_rms_norm(x, residual, _like(self.weight, x), self.eps, backend=backend.generic)


def _linear(layer: nn.Linear, x, backend):
    return ops.linear(x, _like(layer.weight, x), _like(layer.bias, x), backend=backend.generic)


class Attention(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        d, hd = config.d_model, config.head_dim
        self.wq = nn.Linear(d, config.n_head * hd, bias=config.qkv_bias)
        self.wk = nn.Linear(d, config.n_kv_head * hd, bias=config.qkv_bias)
        self.wv = nn.Linear(d, config.n_kv_head * hd, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * hd, d, bias=config.bias)
        self.register_buffer("k_cache", None, persistent=False)
        self.register_buffer("v_cache", None, persistent=False)

    def forward(self, x, rope, input_pos, backend):
        B, S, _ = x.shape
        c = self.config
        q = _linear(self.wq, x, backend).view(B, S, c.n_head, c.head_dim)    # (B, S, H, D)
        k = _linear(self.wk, x, backend).view(B, S, c.n_kv_head, c.head_dim)  # (B, S, Hkv, D)
        v = _linear(self.wv, x, backend).view(B, S, c.n_kv_head, c.head_dim)
        if rope is not None:
            cos, sin = rope
            q = ops.apply_rope(q, cos, sin, backend=backend.generic)
            k = ops.apply_rope(k, cos, sin, backend=backend.generic)
        # The cache is state, not part of any autograd graph: it keeps detached keys and values (a graph recorded
        # into it would outlive its backward). Gradients reach this call's keys and values; rows cached by earlier
        # calls are constants.
        if self.k_cache is None or input_pos is None:
            if self.k_cache is not None:                                       # prefill from position 0
                self.k_cache[:, :S].copy_(k.detach())
                self.v_cache[:, :S].copy_(v.detach())
            y = ops.attention(q, k, v, causal=True, window=(c.window_left, 0), backend=backend.native)
        else:
            positions = input_pos[:, None] + torch.arange(S, device=x.device)  # (B, S)
            rows = torch.arange(B, device=x.device)[:, None].expand(B, S)
            self.k_cache.index_put_((rows, positions), k.detach())
            self.v_cache.index_put_((rows, positions), v.detach())
            k_all, v_all = self.k_cache, self.v_cache
            if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):  # the cache with k, v in the graph
                k_all, v_all = k_all.index_put((rows, positions), k), v_all.index_put((rows, positions), v)
            y = ops.decode_attention(q, k_all, v_all, input_pos + S, window_left=c.window_left,
                                     backend=backend.native)
        return _linear(self.wo, y.reshape(B, S, c.n_head * c.head_dim), backend)


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        d, f = config.d_model, config.intermediate_size
        self.gpt2 = config.family == "gpt2"
        if self.gpt2:
            self.w_fc = nn.Linear(d, f)
            self.w_proj = nn.Linear(f, d)
        else:
            self.w_gate = nn.Linear(d, f, bias=False)
            self.w_up = nn.Linear(d, f, bias=False)
            self.w_down = nn.Linear(f, d, bias=False)

    def forward(self, x, residual, backend):
        """mlp(x) + residual, the add fused into the down projection."""
        if self.gpt2:
            return ops.mlp_gelu(x, *(_like(t, x) for t in (self.w_fc.weight, self.w_fc.bias, self.w_proj.weight,
                                                             self.w_proj.bias)), residual=residual,
                                backend=backend.native)
        return ops.mlp_swiglu(x, *(_like(t, x) for t in (self.w_gate.weight, self.w_up.weight, self.w_down.weight)),
                              residual=residual, backend=backend.native)


class Block(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(self, h, rope, input_pos, backend):
        a = self.attn(self.attn_norm(h, backend), rope, input_pos, backend)
        y, h = self.mlp_norm.add(a, h, backend)
        return self.mlp(y, h, backend)


class Transformer(nn.Module):
    """The fast model on fastlm.ops, with ``backend`` one of "auto", "torch", "triton", "cpu", "cuda".

    "cpu" / "cuda" select the C++ kernels for the ops the extension implements (attention, decode attention, MLPs)
    and "auto" for the others (linear layers, norms, RoPE, cross-entropy; "auto" takes the C++ kernel of such an op
    on a CPU where the extension has one); any other value is passed to every op.

    forward(tokens (B, S), targets=None, input_pos=None, logits_at=None): logits (B, S, V) in the parameters' dtype
    (the autocast dtype under torch.autocast), or with targets (B, S) the mean cross-entropy over targets != -100.
    ``logits_at`` (B, k) int64 / int32 returns only the logits at those positions of each sequence, (B, k, V): the
    LM head runs on k rows instead of S (a prefill that samples from the last prompt token needs one).
    ``input_pos`` (B,) needs a KV cache; positions input_pos + S must stay within the cache and, in such decode
    steps, token ids within the vocabulary (on a GPU neither is checked on the host, so that decoding never
    synchronizes; without input_pos the ids are checked; on a CPU, where reading them costs no sync, both are).
    The cache holds detached keys and values: with autograd on, gradients reach those of the call itself, and rows
    cached by earlier calls are constants. The model reads its Linear layers' weights and never calls them, so a
    Linear with a hook or a forward of its own (an adapter) is refused by the eager forward; under torch.compile that
    check is not run (traced, it misses the hooks): compile only models whose Linear layers are plain.
    """

    def __init__(self, config: Config, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a fastlm.Config, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.max_seqlen, config.d_model) if config.family == "gpt2" else None
        self.layers = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = Norm(config)
        self.lm_head = None if config.tie_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.register_buffer("rope_cos", None, persistent=False)   # (max_seqlen, head_dim) tables with a KV cache
        self.register_buffer("rope_sin", None, persistent=False)
        self.fused_decode = True
        init_weights(self, config)

    @property
    def backend(self) -> str:
        return self._backends.native

    @backend.setter
    def backend(self, backend: str):
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self._backends = _Backends(native=backend, generic="auto" if backend in ("cpu", "cuda") else backend)

    @property
    def head_weight(self) -> torch.Tensor:
        return self.tok_emb.weight if self.lm_head is None else self.lm_head.weight

    # -- KV cache ------------------------------------------------------------------------------------------------

    def setup_cache(self, batch_size: int, max_seqlen: int, dtype=None, device=None):
        """Allocate a static KV cache (batch_size, max_seqlen, n_kv_head, head_dim) per layer on the parameters'
        device (``device``, if given, must name it), in ``dtype``: by default the dtype the forward computes in here,
        the autocast dtype under torch.autocast, else the parameters'. A forward that computes in another dtype than
        the cache's is an error."""
        c = self.config
        for name, value in (("batch_size", batch_size), ("max_seqlen", max_seqlen)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"setup_cache: {name} must be a positive integer, got {value!r}")
        if max_seqlen > c.max_seqlen:
            raise ValueError(f"setup_cache: max_seqlen must be at most the model's context {c.max_seqlen}, "
                             f"got {max_seqlen}")
        dtype = self._compute_dtype() if dtype is None else dtype
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"setup_cache: dtype must be a floating-point torch.dtype, got {dtype!r}")
        device = self._cache_device(device)
        shape = (int(batch_size), int(max_seqlen), c.n_kv_head, c.head_dim)
        nbytes = math.prod(shape) * dtype.itemsize                     # of each of the 2 x n_layer cache tensors
        self.clear_cache()                                             # (the old cache's memory first)
        try:
            if nbytes >= 2 ** 63:
                raise RuntimeError("more bytes than a tensor can hold")
            for layer in self.layers:
                layer.attn.k_cache = torch.zeros(shape, dtype=dtype, device=device)
                layer.attn.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        except (RuntimeError, torch.OutOfMemoryError) as e:
            self.clear_cache()
            raise RuntimeError(f"setup_cache: the KV cache for batch_size {batch_size} x max_seqlen {max_seqlen} needs "
                               f"2 x {c.n_layer} layers x {nbytes} bytes on {device}, which could not be allocated: "
                               f"{str(e).splitlines()[0]}") from None
        if c.family == "llama":
            self.rope_cos, self.rope_sin = ops.rope_cos_sin(torch.arange(max_seqlen, device=device), c.head_dim,
                                                            c.rope_base, self.tok_emb.weight.dtype,
                                                            scaling=c.rope_scaling)

    def _compute_dtype(self) -> torch.dtype:
        """The dtype the forward computes in: the autocast dtype under torch.autocast, else the embedding's."""
        kind = self.tok_emb.weight.device.type
        return torch.get_autocast_dtype(kind) if _autocast_on(kind) else self.tok_emb.weight.dtype

    def _cache_device(self, device) -> torch.device:
        """The parameters' device, which ``device`` (None, or a torch.device or str naming it) must be."""
        own = self.tok_emb.weight.device
        if device is None:
            return own
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError):
            dev = None
        if dev is None or dev.type != own.type or dev.index not in (None, own.index or 0):
            raise ValueError(f"setup_cache: device must be the model's device {own} (the cache is read next to the "
                             f"weights), got {device!r}")
        return own

    def clear_cache(self):
        for layer in self.layers:
            layer.attn.k_cache = None
            layer.attn.v_cache = None
        self.rope_cos = self.rope_sin = None

    def _cache_state(self):
        """The KV cache and RoPE tables as they are, for _set_cache_state to put back."""
        return [(layer.attn.k_cache, layer.attn.v_cache) for layer in self.layers], self.rope_cos, self.rope_sin

    def _set_cache_state(self, state):
        caches, self.rope_cos, self.rope_sin = state
        for layer, (k, v) in zip(self.layers, caches):
            layer.attn.k_cache, layer.attn.v_cache = k, v

    @property
    def cache_shape(self):
        """(batch_size, max_seqlen) of the KV cache, or None when there is none."""
        k = self.layers[0].attn.k_cache
        return None if k is None else (k.shape[0], k.shape[1])

    # -- forward ---------------------------------------------------------------------------------------------------

    def _linears(self):
        """(name, module) of the nn.Linear layers whose weights the ops read (a walk of every module where the blocks
        are wrapped, e.g. by activation checkpointing or FSDP). Dict lookups otherwise: it runs in every forward."""
        out = []
        for i, layer in enumerate(self._modules["layers"]._modules.values()):
            parts = layer._modules
            if type(layer) is not Block:
                return [(n, m) for n, m in self.named_modules() if n.rsplit(".", 1)[-1] in _LINEARS]
            for part in ("attn", "mlp"):
                for name, module in parts[part]._modules.items():
                    if name in _LINEARS:
                        out.append((f"layers.{i}.{part}.{name}", module))
        if self.lm_head is not None:
            out.append(("lm_head", self.lm_head))
        return out

    def _check_linears(self, linears):
        """Each Linear computes what its weight says when called: no hooks of its own, no forward set on the
        instance, an nn.Linear or a parametrized one (its weight property is what the ops read); else a ValueError
        naming it. (Global hooks, e.g. a FLOP counter's, only turn the fused decode step off.)"""
        for name, m in linears:
            # (a parametrization swaps the module's class for a subclass of it)
            linear = type(m) is nn.Linear or (parametrize.is_parametrized(m) and type(m).__bases__ == (nn.Linear,))
            if linear and "forward" not in m.__dict__ and not _hooked(m):
                continue
            raise ValueError(f"{name} is a {type(m).__name__} with hooks or a forward of its own: fastlm.Transformer "
                             "reads its Linear layers' weights and never calls them, so it would compute without "
                             "them (for adapters, use fastlm.patch on a transformers model, whose patched MLP falls "
                             "back to the modules, or fastlm.reference.Transformer)")

    def forward(self, tokens, targets=None, input_pos=None, logits_at=None):
        linears = None if torch.compiler.is_compiling() else self._linears()
        if linears is not None:
            self._check_linears(linears)
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int32,
                                                                                               torch.int64):
            raise TypeError(f"tokens must be an integer tensor of shape (batch, seqlen), got "
                            f"{_describe(tokens)}")
        B, S = tokens.shape
        c = self.config
        if B == 0 or S == 0:
            raise ValueError(f"tokens must have batch >= 1 and seqlen >= 1, got shape {tuple(tokens.shape)}")
        if tokens.device != self.tok_emb.weight.device:
            raise ValueError(f"tokens are on {tokens.device} but the model is on {self.tok_emb.weight.device}")
        if input_pos is None and not torch.compiler.is_compiling() and tokens.device.type != "meta":
            # an out-of-range id would index past the embedding (a device-side assert on a GPU); checked here, not in
            # the decode step (input_pos given), which stays free of host synchronization
            lo, hi = torch.stack(torch.aminmax(tokens)).tolist()                 # one host sync
            if lo < 0 or hi >= c.vocab_size:
                raise ValueError(f"tokens must be ids in [0, {c.vocab_size}), got values in [{lo}, {hi}]")
        cache = self.cache_shape
        limit = c.max_seqlen if cache is None else cache[1]
        if S > limit:
            raise ValueError(f"tokens has seqlen {S}, more than the {'cache' if cache else 'model'} allows "
                             f"({limit})")
        if cache is not None and B != cache[0]:
            raise ValueError(f"tokens has batch {B} but the KV cache was set up for batch {cache[0]}")
        if cache is not None and self.layers[0].attn.k_cache.dtype != self._compute_dtype():
            raise ValueError(f"the KV cache holds {self.layers[0].attn.k_cache.dtype} but the forward computes in "
                             f"{self._compute_dtype()} (the autocast dtype under torch.autocast, else the weights'): "
                             f"set the cache up in it (setup_cache(..., dtype=None) picks it)")
        if logits_at is not None:
            self._check_logits_at(logits_at, B, S, targets, tokens.device)
        if input_pos is None:
            positions = torch.arange(S, device=tokens.device)                  # (S,)
        else:
            if cache is None:
                raise ValueError("input_pos needs a KV cache: call setup_cache(batch_size, max_seqlen) first")
            if not isinstance(input_pos, torch.Tensor) or tuple(input_pos.shape) != (B,) or input_pos.dtype not in (
                    torch.int32, torch.int64):
                raise TypeError(f"input_pos must be an integer tensor of shape (batch,) = ({B},), got "
                                f"{_describe(input_pos)}")
            if input_pos.device != tokens.device:
                raise ValueError(f"input_pos is on {input_pos.device} but tokens are on {tokens.device}")
            if targets is None and self._fused_decode_here(tokens, linears):   # (checks positions and ids itself)
                return _rows_at(self._fused_decode_step(tokens, input_pos), logits_at)
            if tokens.device.type == "cpu" and not torch.compiler.is_compiling():
                _check_cpu_step(tokens, input_pos, cache[1], c.vocab_size)
            positions = input_pos[:, None] + torch.arange(S, device=tokens.device)   # (B, S)

        h = self.tok_emb(tokens)                                               # (B, S, d)
        kind = h.device.type
        if _autocast_on(kind):
            # the whole forward in the autocast dtype, autocast itself off: it would run some torch ops (the "torch"
            # backend's exp, sums, norms) in fp32 on one device and not on another
            with torch.autocast(kind, enabled=False):
                return self._body(h.to(torch.get_autocast_dtype(kind)), positions, input_pos, targets, logits_at)
        return self._body(h, positions, input_pos, targets, logits_at)

    def _body(self, h, positions, input_pos, targets, logits_at):
        """The forward from the token embeddings h (B, S, d) on."""
        B, S, _ = h.shape
        c = self.config
        rope = None
        if self.pos_emb is not None:
            h = h + self.pos_emb(positions).to(h.dtype)
        elif input_pos is not None:                                            # the cache's tables: (B, S, D)
            rope = (self.rope_cos[positions], self.rope_sin[positions])
        else:
            rope = ops.rope_cos_sin(positions, c.head_dim, c.rope_base, h.dtype, scaling=c.rope_scaling)
        for layer in self.layers:
            h = layer(h, rope, input_pos, self._backends)
        y = self.norm(h, self._backends)
        if targets is not None:
            if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != (B, S):
                raise ValueError(f"targets must be a tensor of shape (batch, seqlen) = ({B}, {S}), got "
                                 f"{_describe(targets)}")
            return ops.linear_cross_entropy(y.reshape(B * S, -1), _like(self.head_weight, y), targets.reshape(B * S),
                                            backend=self._backends.generic)
        y = _rows_at(y, logits_at)                                             # (B, k, d) with logits_at
        return ops.linear(y, _like(self.head_weight, y), backend=self._backends.generic)  # (B, S or k, V)

    @staticmethod
    def _check_logits_at(logits_at, B, S, targets, device):
        if targets is not None:
            raise ValueError("logits_at selects logits to return; it cannot be combined with targets (a loss)")
        if not isinstance(logits_at, torch.Tensor) or logits_at.dim() != 2 or logits_at.shape[0] != B or \
                logits_at.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"logits_at must be an integer (int64 or int32) tensor of shape (batch, k) = ({B}, k), "
                            f"got {_describe(logits_at)}")
        if logits_at.device != device:
            raise ValueError(f"logits_at is on {logits_at.device} but tokens are on {device}")
        if logits_at.numel() and not torch.compiler.is_compiling() and device.type != "meta":
            lo, hi = torch.stack(torch.aminmax(logits_at)).tolist()                # one host sync
            if lo < 0 or hi >= S:
                raise ValueError(f"logits_at must hold positions in [0, {S}) of tokens, got values in [{lo}, {hi}]")

    def _fused_decode_here(self, tokens, linears) -> bool:
        """Whether this decode step runs as one C++ call (ops.decode_step): on the CPU backend, when autograd records
        nothing, autocast is off (the step computes in the weights' dtype) and torch.compile is not tracing
        (``linears``, forward's _linears(), is None then), unless
        ``fused_decode`` was set False, a module the step would call has a hook or a forward of its own (the fused
        step would skip it), a Linear is parametrized (it reads the parameters) or the norms' eps differ (it takes
        one)."""
        if not (self.fused_decode and not torch.is_grad_enabled() and linears is not None
                and not _autocast_on(tokens.device.type)
                and decode_step_backend(self._backends.native, tokens.device, self.tok_emb.weight.dtype) == "cpu"):
            return False
        if _global_hooks():
            return False
        called = [(self._modules["tok_emb"], nn.Embedding), (self._modules["norm"], Norm)] + (
            [] if self.pos_emb is None else [(self._modules["pos_emb"], nn.Embedding)])
        eps = self._modules["norm"].eps
        for layer in self._modules["layers"]._modules.values():
            if type(layer) is not Block:                                       # wrapped: not this step's modules
                return False
            m = layer._modules
            called += ((layer, Block), (m["attn_norm"], Norm), (m["attn"], Attention), (m["mlp_norm"], Norm),
                       (m["mlp"], MLP))
            if m["attn_norm"].eps != eps or m["mlp_norm"].eps != eps:
                return False
        # the step reads the Linear layers' parameters themselves: a parametrized one is left to the op-by-op step
        return (all(_calls_its_class(m, cls) for m, cls in called)
                and all(type(m) is nn.Linear for _, m in linears))

    def _fused_decode_step(self, tokens, input_pos):
        # the tensors are looked up afresh every step (a replaced parameter or module is never missed), through the
        # modules' dicts: nn.Module.__getattr__ would cost ~0.5 ms a step for a small model, 5 % of its step time
        blocks, k_caches, v_caches = [], [], []
        for layer in self._modules["layers"]._modules.values():
            mods = layer._modules
            attn, mlp = mods["attn"], mods["mlp"]
            a, m = attn._modules, mlp._modules
            lin = [a["wq"], a["wk"], a["wv"], a["wo"]] + (
                [m["w_fc"], None, m["w_proj"]] if mlp.gpt2 else [m["w_gate"], m["w_up"], m["w_down"]])
            p = [None if x is None else x._parameters for x in lin]
            n1, n2 = mods["attn_norm"]._parameters, mods["mlp_norm"]._parameters
            blocks += [n1["weight"], n1.get("bias"), p[0]["weight"], p[0].get("bias"), p[1]["weight"],
                       p[1].get("bias"), p[2]["weight"], p[2].get("bias"), p[3]["weight"], p[3].get("bias"),
                       n2["weight"], n2.get("bias"), p[4]["weight"], p[4].get("bias"),
                       None if p[5] is None else p[5]["weight"], p[6]["weight"], p[6].get("bias")]
            k_caches.append(attn._buffers["k_cache"])
            v_caches.append(attn._buffers["v_cache"])
        norm = self._modules["norm"]._parameters
        return ops.decode_step(tokens, input_pos, self.tok_emb.weight, blocks, k_caches, v_caches, norm["weight"],
                               self.head_weight, eps=self._modules["norm"].eps, is_rms=norm.get("bias") is None,
                               norm_bias=norm.get("bias"),
                               pos_emb=None if self.pos_emb is None else self.pos_emb.weight,
                               rope_cos=self.rope_cos, rope_sin=self.rope_sin, window_left=self.config.window_left,
                               backend=self._backends.native)

    def generate(self, *args, **kwargs):
        """See fastlm.generate.generate."""
        from fastlm.generate import generate
        return generate(self, *args, **kwargs)


def _autocast_on(kind: str) -> bool:
    """Whether torch.autocast is on for the device type (never for meta, which autocast does not know)."""
    return kind != "meta" and torch.is_autocast_enabled(kind)


def _check_cpu_step(tokens, input_pos, max_seqlen, vocab_size):
    """A decode step's positions and ids, checked where reading them costs no host sync (a CPU), as the fused decode
    step checks them: a negative position would wrap around the cache, an id past the vocabulary index past the
    embedding."""
    S = tokens.shape[1]
    bad = ((input_pos < 0) | (input_pos > max_seqlen - S)).nonzero().flatten().tolist()
    if bad:
        b = bad[0]
        raise ValueError(f"input_pos[{b}] + seqlen = {int(input_pos[b])} + {S} must lie in [{S}, {max_seqlen}] (the "
                         f"KV cache's max_seqlen)")
    lo, hi = torch.stack(torch.aminmax(tokens)).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"tokens must be ids in [0, {vocab_size}), got values in [{lo}, {hi}]")


def _rows_at(t, positions):
    """t (B, S, n) at positions (B, k) of each sequence: (B, k, n); t itself when positions is None."""
    return t if positions is None else t.gather(1, positions.long()[..., None].expand(-1, -1, t.shape[-1]))


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)} dtype {x.dtype}"
    return type(x).__name__
