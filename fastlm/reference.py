"""Reference ops: plain PyTorch math, readable, valid in float64. The ground truth for every fastlm kernel.

Nothing here calls a fused kernel or scaled_dot_product_attention, and nothing imports fastlm.kernels: the
reference cannot share a bug with what it checks.
"""
from __future__ import annotations

import math

import torch


def attention_mask(seqlen_q: int, seqlen_k: int, *, causal: bool = False, window=(-1, -1), device=None, rows=None):
    """Boolean (seqlen_q, seqlen_k) mask, True where query i may attend key j (with ``rows=(start, stop)``, only
    those query rows).

    Positions are aligned bottom-right (FlashAttention >= 2.1): query i sits at key position i + seqlen_k - seqlen_q.
    ``window=(left, right)`` keeps keys within [pos - left, pos + right]; -1 means unbounded; causal sets right = 0.
    """
    left, right = (min(w, seqlen_q + seqlen_k) for w in window)   # larger bounds reach every key as well
    if causal:
        right = 0
    start, stop = rows if rows is not None else (0, seqlen_q)
    i = torch.arange(start, stop, device=device)[:, None] + (seqlen_k - seqlen_q)
    j = torch.arange(seqlen_k, device=device)[None, :]
    keep = torch.ones(stop - start, seqlen_k, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def attention(q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), return_lse=False):
    """Softmax attention in FlashAttention's layout.

    q: (B, Sq, H, D); k, v: (B, Sk, Hkv, D) with H % Hkv == 0 (grouped-query attention).
    Returns out (B, Sq, H, D) in q's dtype, and with ``return_lse`` also lse (B, H, Sq) = logsumexp of the scaled,
    masked scores (float32, or float64 for float64 inputs). A query that sees no key gets out = 0 and lse = -inf.
    """
    keep = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
    return _masked_attention(q, k, v, keep, softmax_scale, return_lse)


def _scores(q, k, scale):
    """S = scale Q K^T, (B, H, Sq, Sk) in q's dtype. For fp16 / bf16 the product is taken in fp32 (as the kernels'
    fp32 accumulators hold it) and only the scaled score rounded to q's dtype: an fp16 q . k past 65504 would be inf
    although the scaled score is not (the kernels keep the scores in fp32 throughout)."""
    if q.dtype in (torch.float16, torch.bfloat16):
        return (torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * scale).to(q.dtype)
    return torch.einsum("bqhd,bkhd->bhqk", q, k) * scale


def _probabilities(q, k, keep, softmax_scale):
    """P = softmax(scale Q K^T) over the keys ``keep`` allows ((B, H, Sq, Sk); a row with no key all zero), the row
    maxima m it was shifted by (0 for such a row) and its row sums before normalization; and k's heads repeated to
    q's."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    k = k.repeat_interleave(H // Hkv, dim=2)
    s = _scores(q, k, scale)                                                 # (B, H, Sq, Sk)
    s = s.masked_fill(~keep, float("-inf"))
    m = s.amax(dim=-1, keepdim=True) if Sk > 0 else s.new_full((B, H, Sq, 1), float("-inf"))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m).detach()        # rows with no key: shift by 0
    e = torch.exp(s - m)                                                     # masked entries: exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    return e / torch.where(denom == 0, torch.ones_like(denom), denom), m, denom, k


def _masked_attention(q, k, v, keep, softmax_scale, return_lse=False):
    """attention() with the mask given: ``keep`` broadcasts to (B, H, Sq, Sk), True where a query may see a key."""
    p, m, denom, _ = _probabilities(q, k, keep, softmax_scale)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    out = torch.einsum("bhqk,bkhd->bqhd", p, v).to(q.dtype)
    if not return_lse:
        return out
    lse = (torch.log(denom) + m).squeeze(-1)                                 # log(0) = -inf for empty rows
    return out, lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32)


def attention_backward(dout, q, k, v, *, causal=False, softmax_scale=None, window=(-1, -1), dlse=None):
    """(dq, dk, dv) of attention() for the output gradient ``dout`` (and ``dlse``, the LSE's, if given), by the
    explicit formulas, without autograd: P = softmax(S) as the forward computes it, dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(P dP)) (+ P dlse), dQ = dS K scale, dK = dS^T Q scale; K and V's gradients summed over the
    query heads that share them. For code that cannot record a graph (a custom op's kernel)."""
    keep = attention_mask(q.shape[1], k.shape[1], causal=causal, window=window, device=q.device)
    dq, dk, dv = masked_attention_backward(dout, q, k, v, keep, softmax_scale, dlse)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def masked_attention_backward(dout, q, k, v, keep, softmax_scale=None, dlse=None):
    """attention_backward() with the (Sq, Sk) mask ``keep`` given, its gradients not yet cast to the inputs' dtypes:
    the query rows of a problem can be taken in blocks (their rows of the mask), their dK and dV summed."""
    B, Sq, H, D = q.shape
    Sk, Hkv = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(D) if softmax_scale is None else softmax_scale
    group = H // Hkv
    p, _, _, ke = _probabilities(q, k, keep, scale)                               # (B, H, Sq, Sk)
    ve = v.repeat_interleave(group, dim=2)
    do = dout.to(p.dtype)
    dv = torch.einsum("bhqk,bqhd->bkhd", p, do)
    dp = torch.einsum("bqhd,bkhd->bhqk", do, ve)
    ds = p * (dp - (p * dp).sum(dim=-1, keepdim=True))
    if dlse is not None:
        ds = ds + p * dlse.to(p.dtype)[..., None]
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, ke) * scale
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q.to(p.dtype)) * scale

    def per_kv_head(g):  # (B, Sk, H, D) -> (B, Sk, Hkv, D)
        return g.view(B, Sk, Hkv, group, D).sum(dim=3)
    return dq, per_kv_head(dk), per_kv_head(dv)


def decode_attention(q, k_cache, v_cache, cache_seqlens, *, softmax_scale=None, window_left=-1):
    """Attention of a few new queries against a KV cache.

    q: (B, Sq, H, D); k_cache, v_cache: (B, S_max, Hkv, D); cache_seqlens: (B,) integer, the number of valid cache
    positions for each sequence (the new tokens' keys already written). Query i of sequence b sits at position
    p = cache_seqlens[b] - Sq + i and sees keys 0..p (causal, bottom-right), or only p - window_left..p with a
    sliding window (window_left >= 0). Returns (B, Sq, H, D). The lengths are never read on the host (no sync).
    """
    Sq, S = q.shape[1], k_cache.shape[1]
    n = cache_seqlens.clamp(0, S)                                       # into [0, S_max], as the kernels do
    pos = n[:, None] - Sq + torch.arange(Sq, device=q.device)           # (B, Sq): the last key each query sees
    j = torch.arange(S, device=q.device)
    keep = j <= pos[..., None]                                          # (B, Sq, S)
    if window_left >= 0:
        keep &= j >= pos[..., None] - window_left
    # cache rows no query sees (past the lengths, before every window) may hold anything, NaN included: 0 x NaN in
    # the P V product (and in dQ = dS K) would reach every row
    unseen = ~keep.any(dim=1)[:, :, None, None]
    k_cache, v_cache = k_cache.masked_fill(unseen, 0), v_cache.masked_fill(unseen, 0)
    return _masked_attention(q, k_cache, v_cache, keep[:, None], softmax_scale)


def _stat_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last dim; statistics in float32 (float64 for float64 input); output in x's dtype."""
    xf = x.to(_stat_dtype(x))
    mean = xf.mean(dim=-1, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=-1, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps) * weight.to(xf.dtype)
    if bias is not None:
        y = y + bias.to(xf.dtype)
    return y.to(x.dtype)


def rms_norm(x, weight, eps=1e-6):
    """RMSNorm over the last dim (Llama): x / sqrt(mean(x^2) + eps) * weight, statistics in float32."""
    xf = x.to(_stat_dtype(x))
    y = xf * torch.rsqrt((xf * xf).mean(dim=-1, keepdim=True) + eps)
    return (y * weight.to(xf.dtype)).to(x.dtype)


def add_norm(x, residual, weight, bias=None, eps=1e-5, kind="rms"):
    """The fused residual + norm pattern: h = x + residual; returns (norm(h), h)."""
    h = x + residual
    y = rms_norm(h, weight, eps) if kind == "rms" else layer_norm(h, weight, bias, eps)
    return y, h


def rope_inv_freq(head_dim, base=10000.0, scaling=None, device=None):
    """The head_dim / 2 rotation frequencies (float64): base^(-2i / head_dim), rescaled by ``scaling`` (see
    fastlm.config.ROPE_SCALING_KEYS): "linear" divides them all by factor; "llama3" divides those whose wavelength
    2 pi / f exceeds original / low_freq_factor by factor, keeps those below original / high_freq_factor, and in
    between blends the two linearly in original / wavelength."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim))
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    periods = scaling["original_max_position_embeddings"] * inv_freq / (2 * math.pi)   # original / wavelength
    keep = ((periods - low) / (high - low)).clamp(0.0, 1.0)                # 0: divide by factor, 1: keep
    return (1.0 - keep) * inv_freq / scaling["factor"] + keep * inv_freq


def rope_cos_sin(positions, head_dim, base=10000.0, dtype=torch.float32, scaling=None):
    """cos, sin tables (len(positions), head_dim) for rotate-half RoPE (Hugging Face's Llama convention), with the
    frequencies of rope_inv_freq."""
    inv_freq = rope_inv_freq(head_dim, base, scaling, positions.device)
    freqs = positions.to(torch.float64)[:, None] * inv_freq[None, :]       # (S, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)                                 # (S, D)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """x: (B, S, H, D); cos, sin: (S, D) or (B, S, D). Returns x * cos + rotate_half(x) * sin in x's dtype."""
    if cos.dim() == 2:
        cos, sin = cos[None], sin[None]
    cos, sin = cos[:, :, None, :].to(x.dtype), sin[:, :, None, :].to(x.dtype)
    return x * cos + rotate_half(x) * sin


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def mlp_gelu(x, w_fc, b_fc, w_proj, b_proj, residual=None):
    """GPT-2 MLP: proj(gelu_tanh(fc(x))) (+ residual). Weights in nn.Linear layout (out_features, in_features)."""
    h = gelu_tanh(torch.nn.functional.linear(x, w_fc, b_fc))
    y = torch.nn.functional.linear(h, w_proj, b_proj)
    return y if residual is None else y + residual


def mlp_swiglu(x, w_gate, w_up, w_down, residual=None):
    """Llama MLP: down(silu(gate(x)) * up(x)) (+ residual)."""
    g = torch.nn.functional.linear(x, w_gate)
    u = torch.nn.functional.linear(x, w_up)
    y = torch.nn.functional.linear(g * torch.sigmoid(g) * u, w_down)
    return y if residual is None else y + residual


def cross_entropy(logits, targets, *, ignore_index=-100, reduction="mean"):
    """Cross-entropy of (N, V) logits against (N,) targets, computed in float32 (float64 for float64 logits).

    Targets equal to ignore_index contribute nothing; "mean" divides by the number of non-ignored targets
    (0 when there are none); "none" returns the per-token losses (0 at ignored positions)."""
    lf = logits.to(_stat_dtype(logits))
    lse = torch.logsumexp(lf, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    picked = lf.gather(-1, safe[:, None]).squeeze(-1)
    loss = torch.where(valid, lse - picked, torch.zeros_like(lse))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / valid.sum().clamp(min=1)


def linear_cross_entropy(x, weight, targets, bias=None, *, ignore_index=-100, reduction="mean"):
    """cross_entropy(x @ weight.T + bias, targets): the LM head and the loss, x (N, d), weight (V, d)."""
    return cross_entropy(torch.nn.functional.linear(x, weight, bias), targets, ignore_index=ignore_index,
                         reduction=reduction)


# ----------------------------------------------------------------------------------------------------------------------
# The reference Transformer: the model written plainly with the ops above. fastlm.Transformer has the same parameter
# names and shapes, so a state dict loads into either.
# ----------------------------------------------------------------------------------------------------------------------

class Attention(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        d, hd = config.d_model, config.head_dim
        self.wq = torch.nn.Linear(d, config.n_head * hd, bias=config.qkv_bias)
        self.wk = torch.nn.Linear(d, config.n_kv_head * hd, bias=config.qkv_bias)
        self.wv = torch.nn.Linear(d, config.n_kv_head * hd, bias=config.qkv_bias)
        self.wo = torch.nn.Linear(config.n_head * hd, d, bias=config.bias)

    def forward(self, x, cos=None, sin=None):
        B, S, _ = x.shape
        c = self.config
        q = self.wq(x).view(B, S, c.n_head, c.head_dim)                       # (B, S, H, D)
        k = self.wk(x).view(B, S, c.n_kv_head, c.head_dim)                    # (B, S, Hkv, D)
        v = self.wv(x).view(B, S, c.n_kv_head, c.head_dim)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = attention(q, k, v, causal=True, window=(c.window_left, 0))         # (B, S, H, D)
        return self.wo(y.reshape(B, S, c.n_head * c.head_dim))


class MLP(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        d, f = config.d_model, config.intermediate_size
        self.gpt2 = config.family == "gpt2"
        if self.gpt2:
            self.w_fc = torch.nn.Linear(d, f)
            self.w_proj = torch.nn.Linear(f, d)
        else:
            self.w_gate = torch.nn.Linear(d, f, bias=False)
            self.w_up = torch.nn.Linear(d, f, bias=False)
            self.w_down = torch.nn.Linear(f, d, bias=False)

    def forward(self, x):
        if self.gpt2:
            return mlp_gelu(x, self.w_fc.weight, self.w_fc.bias, self.w_proj.weight, self.w_proj.bias)
        return mlp_swiglu(x, self.w_gate.weight, self.w_up.weight, self.w_down.weight)


class Norm(torch.nn.Module):
    """LayerNorm (with bias) for gpt2, RMSNorm for llama."""

    def __init__(self, config):
        super().__init__()
        self.eps = config.norm_eps
        self.weight = torch.nn.Parameter(torch.ones(config.d_model))
        self.bias = torch.nn.Parameter(torch.zeros(config.d_model)) if config.family == "gpt2" else None

    def forward(self, x):
        if self.bias is not None:
            return layer_norm(x, self.weight, self.bias, self.eps)
        return rms_norm(x, self.weight, self.eps)


class Block(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.attn_norm = Norm(config)
        self.attn = Attention(config)
        self.mlp_norm = Norm(config)
        self.mlp = MLP(config)

    def forward(self, x, cos=None, sin=None):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


def init_weights(model, config):
    """GPT-2 style initialisation: N(0, 0.02) weights, zero biases, unit norms; the projections that write into the
    residual stream (wo, w_proj, w_down) scaled by 1/sqrt(2 * n_layer)."""
    std = 0.02
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            torch.nn.init.ones_(p)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)
        elif name.endswith(("wo.weight", "w_proj.weight", "w_down.weight")):
            torch.nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * config.n_layer))
        else:
            torch.nn.init.normal_(p, mean=0.0, std=std)


class Transformer(torch.nn.Module):
    """The decoder-only Transformer of a fastlm.Config, in plain PyTorch.

    Parameters: tok_emb, pos_emb (gpt2), layers.{i}.{attn_norm, attn.{wq,wk,wv,wo}, mlp_norm,
    mlp.{w_fc,w_proj} | mlp.{w_gate,w_up,w_down}}, norm, lm_head (absent when the head is tied to tok_emb).
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.tok_emb = torch.nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = torch.nn.Embedding(config.max_seqlen, config.d_model) if config.family == "gpt2" else None
        self.layers = torch.nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.norm = Norm(config)
        self.lm_head = None if config.tie_embeddings else torch.nn.Linear(config.d_model, config.vocab_size,
                                                                          bias=False)
        init_weights(self, config)

    def forward(self, tokens, targets=None):
        """tokens (B, S) -> logits (B, S, V); with targets (B, S) the mean cross-entropy (-100 ignored) instead."""
        B, S = tokens.shape
        c = self.config
        positions = torch.arange(S, device=tokens.device)
        x = self.tok_emb(tokens)                                               # (B, S, d)
        cos = sin = None
        if self.pos_emb is not None:
            x = x + self.pos_emb(positions)
        else:
            cos, sin = rope_cos_sin(positions, c.head_dim, c.rope_base, x.dtype, c.rope_scaling)   # (S, D)
        for layer in self.layers:
            x = layer(x, cos, sin)
        x = self.norm(x)
        head = self.tok_emb.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(x, head)                           # (B, S, V)
        if targets is None:
            return logits
        return cross_entropy(logits.reshape(B * S, -1), targets.reshape(B * S))
