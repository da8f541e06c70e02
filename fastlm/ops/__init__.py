"""fastlm.ops: one public function per op. Each checks its arguments, picks a backend (fastlm.backends) and runs
the Triton kernel, the C++ (CPU/CUDA) kernel or the reference. The model calls only these."""
import importlib

_OPS = {
    "attention": "attention",
    "decode_attention": "decode",
    "layer_norm": "norm", "rms_norm": "norm", "add_layer_norm": "norm", "add_rms_norm": "norm",
    "apply_rope": "rope", "rope_cos_sin": "rope",
    "mlp_gelu": "ffn", "mlp_swiglu": "ffn",
    "cross_entropy": "cross_entropy", "linear_cross_entropy": "cross_entropy",
}

__all__ = list(_OPS)

# Bound eagerly where a module shares its op's name: a later `import fastlm.ops.attention` must not shadow the function.
from fastlm.ops.attention import attention  # noqa: E402


def __getattr__(name):
    if name not in _OPS:
        raise AttributeError(f"module 'fastlm.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fastlm.ops.{_OPS[name]}"), name)
    globals()[name] = value
    return value
