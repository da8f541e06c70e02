"""fastlm.kernels: the Triton kernels, one module per op. Nothing here knows about models or configs."""
