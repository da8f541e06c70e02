"""Model configuration: one dataclass for both families, presets as a plain dict of dicts.

GPT-2 family: learned positions, pre-LayerNorm, biased multi-head attention, GELU-tanh MLP, tied LM head.
Llama family: RoPE, RMSNorm, grouped-query attention, SwiGLU MLP, untied LM head (presets may tie it).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields

FAMILIES = ("gpt2", "llama")

PRESETS: dict[str, dict] = {
    # test sizes
    "gpt2-tiny": dict(family="gpt2", vocab_size=1000, n_layer=2, n_head=4, d_model=64, max_seqlen=128),
    "llama-tiny": dict(family="llama", vocab_size=1000, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                       max_seqlen=128, multiple_of=32),
    # GPT-2 (Radford et al. 2019), 1024 learned positions
    "gpt2": dict(family="gpt2", vocab_size=50257, n_layer=12, n_head=12, d_model=768, max_seqlen=1024),
    "gpt2-medium": dict(family="gpt2", vocab_size=50257, n_layer=24, n_head=16, d_model=1024, max_seqlen=1024),
    "gpt2-large": dict(family="gpt2", vocab_size=50257, n_layer=36, n_head=20, d_model=1280, max_seqlen=1024),
    "gpt2-xl": dict(family="gpt2", vocab_size=50257, n_layer=48, n_head=25, d_model=1600, max_seqlen=1024),
    # Llama shapes
    "llama-56m": dict(family="llama", vocab_size=32000, n_layer=8, n_head=8, n_kv_head=4, d_model=512,
                      intermediate_size=1408, max_seqlen=2048),
    "llama-1b-like": dict(family="llama", vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                          intermediate_size=8192, max_seqlen=8192, rope_base=500000.0, tie_embeddings=True),
    "llama-2-7b": dict(family="llama", vocab_size=32000, n_layer=32, n_head=32, d_model=4096,
                       intermediate_size=11008, max_seqlen=4096),
    "llama-3-8b": dict(family="llama", vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                       intermediate_size=14336, max_seqlen=8192, rope_base=500000.0),
    # Llama 3.1 / 3.2: Llama 3 shapes with "llama3" RoPE scaling to a 128K context
    "llama-3.1-8b": dict(family="llama", vocab_size=128256, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                         intermediate_size=14336, max_seqlen=131072, rope_base=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-3.2-1b": dict(family="llama", vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, d_model=2048,
                         intermediate_size=8192, max_seqlen=131072, rope_base=500000.0, tie_embeddings=True,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Mistral 7B v0.1: Llama's architecture with a 4096-token sliding window in every layer
    "mistral-7b-v0.1": dict(family="llama", vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, d_model=4096,
                            intermediate_size=14336, max_seqlen=32768, sliding_window=4096),
    # Mistral NeMo 12B: Llama's architecture with 32 heads of 128 on a 5120-wide model (head_dim != d_model / n_head)
    "mistral-nemo-12b": dict(family="llama", vocab_size=131072, n_layer=40, n_head=32, n_kv_head=8, d_model=5120,
                             head_dim=128, intermediate_size=14336, max_seqlen=131072, rope_base=1000000.0),
}


# RoPE frequency rescaling for contexts past the trained length, as Hugging Face configs write it ("rope_type" and
# these keys): "linear" divides every frequency by factor (position interpolation); "llama3" (Llama 3.1+) divides
# the low ones, keeps the high ones and blends in between (fastlm.reference.rope_inv_freq).
ROPE_SCALING_KEYS = {"linear": ("factor",),
                     "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def check_rope_scaling(scaling) -> dict | None:
    """``scaling`` (None, or a dict with "rope_type" and that type's keys) checked, as a new dict of exactly those
    keys; ValueError/TypeError naming what is wrong."""
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be None or a dict, got {type(scaling).__name__} {scaling!r}")
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALING_KEYS:
        raise ValueError(f"rope_scaling['rope_type'] must be one of {tuple(ROPE_SCALING_KEYS)}, got {kind!r}")
    keys = ROPE_SCALING_KEYS[kind]
    missing = [k for k in keys if k not in scaling]
    extra = sorted(set(scaling) - set(keys) - {"rope_type"})
    if missing or extra:
        raise ValueError(f"rope_scaling of type {kind!r} takes exactly the keys {keys}; missing {missing}, "
                         f"unknown {extra}")
    out = {"rope_type": kind}
    for k in keys:
        if not is_real(scaling[k]) or not 0 < scaling[k] < math.inf:
            raise ValueError(f"rope_scaling[{k!r}] must be a positive finite number, got {scaling[k]!r}")
        out[k] = plain(scaling[k])
    if out["factor"] < 1:
        raise ValueError(f"rope_scaling['factor'] must be >= 1 (it stretches the context), got {out['factor']!r}")
    if kind == "llama3" and not is_int(out["original_max_position_embeddings"]):
        raise ValueError(f"rope_scaling['original_max_position_embeddings'] must be an integer, got "
                         f"{out['original_max_position_embeddings']!r}")
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError(f"rope_scaling: high_freq_factor ({out['high_freq_factor']}) must exceed low_freq_factor "
                         f"({out['low_freq_factor']})")
    return out


def sliding_window_left(sliding_window) -> int:
    """The attention ops' left window bound of a sliding window of W keys (each query sees itself and the W - 1 keys
    before it): W - 1, or -1 (every earlier key) for None. Raises ValueError unless W is a positive integer or None."""
    if sliding_window is None:
        return -1
    if not is_int(sliding_window) or sliding_window <= 0:
        raise ValueError(f"sliding_window must be a positive integer or None, got {sliding_window!r}")
    return sliding_window - 1


def is_int(value) -> bool:
    """An integer (Python's or numpy's), not a bool: what Config fields and the training / scaling arguments take.
    Where such a value is kept (Config fields, run settings written to JSON) it is stored as ``plain(value)``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number (Python's or numpy's), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def plain(value):
    """A checked number as a Python int or float (numpy scalars are not JSON-serializable); anything else as is."""
    if type(value) in (bool, int, float):  # (np.float64 is a float subclass: made plain too)
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    return float(value) if isinstance(value, numbers.Real) else value


@dataclass
class Config:
    """Shape and hyper-parameters of a decoder-only Transformer.

    Fields left as None take the family's default in ``__post_init__``: n_kv_head = n_head; intermediate_size =
    4 * d_model (gpt2) or 2/3 * 4 * d_model rounded up to a multiple of ``multiple_of`` (llama); tie_embeddings and
    bias True for gpt2, False for llama; qkv_bias (biases on the q/k/v projections only) equal to bias — a llama
    with qkv_bias=True is Qwen2's architecture. ``rope_scaling`` (llama only): None, or a dict as Hugging Face
    writes it — {"rope_type": "linear", "factor": f} or {"rope_type": "llama3", "factor", "low_freq_factor",
    "high_freq_factor", "original_max_position_embeddings"} (see ROPE_SCALING_KEYS). ``head_dim`` defaults to
    d_model / n_head; given, the attention works in n_head * head_dim dimensions that need not equal d_model (as in
    Mistral NeMo). ``sliding_window`` (llama only): W, each query sees itself and the W - 1 keys before it (Mistral
    7B v0.1's 4096), in every layer; None: every earlier key. Derived fields are stored: ``dataclasses.replace`` of
    d_model or n_head keeps them unless they are passed as None too; ``Config.from_name(preset, **overrides)`` derives
    them afresh.
    """
    name: str = "custom"
    family: str = "llama"
    vocab_size: int = 32000
    n_layer: int = 2
    n_head: int = 4
    n_kv_head: int | None = None
    d_model: int = 64
    intermediate_size: int | None = None
    max_seqlen: int = 2048
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    rope_scaling: dict | None = None
    tie_embeddings: bool | None = None
    bias: bool | None = None
    qkv_bias: bool | None = None
    multiple_of: int = 256
    head_dim: int | None = None
    sliding_window: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise TypeError(f"name must be a str, got {type(self.name).__name__} {self.name!r}")
        if not isinstance(self.family, str) or self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if self.tie_embeddings is None:
            self.tie_embeddings = self.family == "gpt2"
        if self.bias is None:
            self.bias = self.family == "gpt2"
        if self.qkv_bias is None:
            self.qkv_bias = self.bias
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "max_seqlen", "multiple_of"):
            value = getattr(self, name)
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.intermediate_size is None:
            if self.family == "gpt2":
                self.intermediate_size = 4 * self.d_model
            else:
                hidden = int(2 * 4 * self.d_model / 3)
                self.intermediate_size = self.multiple_of * -(-hidden // self.multiple_of)
        if not is_int(self.intermediate_size) or self.intermediate_size <= 0:
            raise ValueError(f"intermediate_size must be a positive integer, got {self.intermediate_size!r}")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if not is_real(value) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("tie_embeddings", "bias", "qkv_bias"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool or None, got {getattr(self, name)!r}")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}), or head_dim "
                                 f"given")
            self.head_dim = self.d_model // self.n_head
        elif not is_int(self.head_dim) or self.head_dim <= 0:
            raise ValueError(f"head_dim must be a positive integer or None, got {self.head_dim!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if self.family == "llama" and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.bias != (self.family == "gpt2"):
            raise ValueError(f"bias={self.bias} is not supported for the {self.family} family (gpt2 has biases on "
                             f"every linear layer, llama on none)")
        if self.bias and not self.qkv_bias:
            raise ValueError("qkv_bias=False with bias=True is not supported (bias covers every linear layer)")
        if sliding_window_left(self.sliding_window) >= 0:
            if self.family != "llama":
                raise ValueError(f"sliding_window applies to the llama family, got family {self.family!r}")
        self.rope_scaling = check_rope_scaling(self.rope_scaling)
        if self.rope_scaling is not None and self.family != "llama":
            raise ValueError(f"rope_scaling applies to RoPE (the llama family); the {self.family} family has "
                             f"learned positions")
        if self.family == "gpt2" and self.n_kv_head != self.n_head:
            raise ValueError(f"the gpt2 family has no grouped-query attention: n_kv_head ({self.n_kv_head}) "
                             f"must equal n_head ({self.n_head})")
        for f in fields(self):  # numpy scalars as Python numbers: the config is written to JSON
            setattr(self, f.name, plain(getattr(self, f.name)))

    @classmethod
    def from_name(cls, preset: str, /, **overrides) -> "Config":
        """The preset ``preset`` (see PRESETS), with any field replaced by ``overrides`` — ``name`` included (it
        defaults to the preset's name)."""
        if not isinstance(preset, str):
            raise TypeError(f"the preset name must be a str (one of {', '.join(PRESETS)}), got "
                            f"{type(preset).__name__} {preset!r}")
        if preset not in PRESETS:
            raise ValueError(f"unknown model preset {preset!r}; presets: {', '.join(PRESETS)}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown Config field(s) {sorted(unknown)}; fields: {sorted(known)}")
        return cls(**{"name": preset, **PRESETS[preset], **overrides})

    @property
    def window_left(self) -> int:
        """The attention ops' window left bound: sliding_window - 1, or -1 (every earlier key)."""
        return sliding_window_left(self.sliding_window)

    def num_params(self, *, embeddings: bool = True) -> int:
        """Parameter count of the model this config builds (equals sum(p.numel()) of fastlm.Transformer).

        ``embeddings=False`` leaves out the token and position embeddings (and an untied LM head)."""
        d, hd = self.d_model, self.head_dim
        q_out, kv_out = self.n_head * hd, self.n_kv_head * hd
        attn = d * q_out + 2 * d * kv_out + q_out * d
        if self.qkv_bias:
            attn += q_out + 2 * kv_out
        if self.bias:
            attn += d
        if self.family == "gpt2":
            mlp = 2 * d * self.intermediate_size + self.intermediate_size + d
            norms = 2 * 2 * d
            final_norm = 2 * d
        else:
            mlp = 3 * d * self.intermediate_size
            norms = 2 * d
            final_norm = d
        total = self.n_layer * (attn + mlp + norms) + final_norm
        if embeddings:
            total += self.vocab_size * d
            if self.family == "gpt2":
                total += self.max_seqlen * d
            if not self.tie_embeddings:
                total += self.vocab_size * d
        return total
