"""fastlm.ops: one public function per op. Each checks its arguments, picks a backend (fastlm.backends) and runs
the Triton kernel, the C++ (CPU/CUDA) kernel or the reference. The model calls only these.

The op modules import no Triton kernel at import time (kernels are imported when a Triton backend first runs), so
importing fastlm.ops compiles nothing. Functions are bound here explicitly: two modules share their op's name
(attention, cross_entropy), and the function must win over the submodule.
"""
from fastlm.ops.attention import attention
from fastlm.ops.cross_entropy import cross_entropy, linear_cross_entropy
from fastlm.ops.decode import decode_attention, decode_step
from fastlm.ops.ffn import mlp_gelu, mlp_swiglu
from fastlm.ops.linear import linear
from fastlm.ops.norm import add_layer_norm, add_rms_norm, layer_norm, rms_norm
from fastlm.ops.rope import apply_rope, rope_cos_sin

__all__ = ["attention", "decode_attention", "decode_step", "layer_norm", "rms_norm", "add_layer_norm", "add_rms_norm",
           "apply_rope", "rope_cos_sin", "linear", "mlp_gelu", "mlp_swiglu", "cross_entropy", "linear_cross_entropy"]
