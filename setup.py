"""fastlm: fused Transformer kernels in Triton, CUDA C++ and C++ (CPU).

The C++ extension ``fastlm._C`` is built from ``csrc/``: the CPU kernels always (g++ and OpenMP only), the CUDA
kernels too when the installed torch is a CUDA build and nvcc is found. ``import fastlm`` works without it.
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _extensions():
    if os.environ.get("FASTLM_NO_EXTENSION") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:  # metadata-only builds (e.g. `pip download`); no kernels then
        return [], {}
    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("csrc/*.cpp"))
    if not cpu_sources:
        return [], {}
    # no implicit FMA contraction (GCC and Clang fuse a * b + c by default): the kernels spell out their FMAs, and some
    # results depend on an expression being rounded as written (csrc/cpu/simd.h)
    cxx = ["-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp"]
    # the instruction set the CPU kernels are compiled for: by default the build machine's own (AVX-512 and AVX512-BF16
    # where it has them); e.g. FASTLM_MARCH=x86-64-v3 for AVX2 + FMA only, an empty value for the compiler's default
    if "FASTLM_NATIVE" in os.environ:
        raise RuntimeError("FASTLM_NATIVE is replaced by FASTLM_MARCH: FASTLM_MARCH= (empty) for the compiler's "
                           "default instruction set, e.g. FASTLM_MARCH=x86-64-v3 for AVX2 + FMA")
    march = os.environ.get("FASTLM_MARCH", "native")
    if march:
        cxx.append(f"-march={march}")
    define_macros = []
    ldflags = ["-fopenmp"]
    sanitize = os.environ.get("FASTLM_SANITIZE")  # e.g. "address,undefined": the sanitizer build of tests/sanitize.py
    if sanitize:
        # -O1 (after -O3, so it wins): half the build time, and the level the sanitizers are documented for
        cxx += [f"-fsanitize={sanitize}", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer", "-g", "-O1"]
        ldflags.append(f"-fsanitize={sanitize}")
    with_cuda = (torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
                 and os.environ.get("FASTLM_NO_CUDA") != "1")
    if with_cuda:
        cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
        archs = os.environ.get("FASTLM_CUDA_ARCHS", "80;90a").split(";")
        nvcc = ["-O3", "-std=c++17", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
        nvcc += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        # and the PTX of the oldest portable arch, which the driver compiles for a GPU newer than every listed one
        # (e.g. Blackwell: its mma.sync kernels; arch-specific "a" PTX runs on its own arch only)
        portable = [a for a in archs if a.isdigit()]
        if portable:
            oldest = min(portable, key=int)
            nvcc.append(f"-gencode=arch=compute_{oldest},code=compute_{oldest}")
        define_macros.append(("FASTLM_WITH_CUDA", "1"))
        if "90" in archs and "90a" in archs:
            raise RuntimeError("FASTLM_CUDA_ARCHS: list 90a or 90, not both (which one a 9.0 GPU loads is not "
                               "defined, and only 90a has the wgmma kernels)")
        if "90a" in archs:                                   # the wgmma kernels are compiled in
            define_macros.append(("FASTLM_CUDA_SM90A", "1"))
        ext = cpp_extension.CUDAExtension(
            "fastlm._C", cpu_sources + cuda_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=ldflags)
    else:
        ext = cpp_extension.CppExtension(
            "fastlm._C", cpu_sources, include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=define_macros, extra_compile_args={"cxx": cxx}, extra_link_args=ldflags)
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    name="fastlm",
    version="0.1.0",
    description="Fused Transformer kernels (Triton, CUDA C++, C++ CPU) tested against a float64 reference",
    python_requires=">=3.10",
    packages=["fastlm", "fastlm.ops", "fastlm.kernels"],
    package_dir={"fastlm.kernels": "kernels"},
    package_data={"fastlm": ["data/*.txt"]},
    install_requires=["torch>=2.6", "numpy", "triton; sys_platform == 'linux'", "tqdm", "safetensors"],
    extras_require={"test": ["pytest", "pytest-benchmark", "pytest-timeout", "transformers"],
                    "plots": ["matplotlib"]},
    entry_points={"console_scripts": ["fastlm=fastlm.__main__:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
