"""fastlm: a decoder-only Transformer (GPT-2 and Llama families) on fused kernels, tested against a float64 reference.

Public names: Config, Transformer, from_hf, to_hf, patch, unpatch, summary, and the modules ops, reference, backends,
testing, kernels. Submodules are imported lazily, so ``import fastlm`` compiles nothing and needs neither a GPU nor
the C++ extension.
"""
import importlib
import importlib.abc
import importlib.machinery
import os
import sys

__version__ = "0.1.0"

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _CheckoutKernelsFinder(importlib.abc.MetaPathFinder):
    """Run from a checkout (``python -m fastlm`` or ``python -m pytest`` in it), the checkout's root is on sys.path,
    and its kernels/ (the sources of fastlm.kernels) would be found as a top-level package ``kernels``, in place of
    the PyPI package of that name that transformers imports. The top-level name is looked up past the checkout."""

    def find_spec(self, name, path=None, target=None):
        if name != "kernels":
            return None
        outside = [p for p in sys.path if os.path.abspath(p or os.curdir) != _CHECKOUT]
        return importlib.machinery.PathFinder.find_spec(name, outside, target)


if (os.path.isfile(os.path.join(_CHECKOUT, "setup.py")) and os.path.isdir(os.path.join(_CHECKOUT, "kernels"))
        and "kernels" not in sys.modules):
    sys.meta_path.insert(0, _CheckoutKernelsFinder())

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
