"""fastlm: a decoder-only Transformer (GPT-2 and Llama families) on fused kernels, tested against a float64 reference.

Public names: Config, Transformer, from_hf, to_hf, patch, unpatch, summary, and the modules ops, reference, backends,
testing, kernels. Submodules are imported lazily, so ``import fastlm`` compiles nothing and needs neither a GPU nor
the C++ extension.
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "Config": ("fastlm.config", "Config"),
    "Transformer": ("fastlm.model", "Transformer"),
    "from_hf": ("fastlm.hf", "from_hf"),
    "to_hf": ("fastlm.hf", "to_hf"),
    "patch": ("fastlm.hf", "patch"),
    "unpatch": ("fastlm.hf", "unpatch"),
    "summary": ("fastlm.summary", "summary"),
}
_SUBMODULES = ("ops", "reference", "backends", "testing", "kernels")

__all__ = list(_LAZY) + list(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"fastlm.{name}")
    else:
        raise AttributeError(f"module 'fastlm' has no attribute {name!r}")
    globals()[name] = value
    return value
