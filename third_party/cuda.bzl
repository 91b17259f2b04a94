"""Compiles CUDA sources with the toolkit's nvcc (no rules_cuda offline).

cuda_object(name, src, hdrs) declares a genrule that compiles one .cu file into a
position-independent object `<name>.pic.o` for sm_80 and sm_90 (SASS for both,
plus compute_90 PTX so that newer GPUs can JIT it). List the object in a
cc_library's srcs next to @local_cuda//:cudart, when CUDA_FOUND
(from @local_cuda//:defs.bzl); without the toolkit it declares nothing. See
third_party/cuda_configure.bzl.

Includes resolve from the workspace root; a .cu file includes only the headers
listed in `hdrs` and the toolkit's.
"""

load("@local_cuda//:defs.bzl", "CUDA_FOUND", "NVCC")

# Ampere (A100) and Hopper (H100/H200) machine code, and PTX for later GPUs.
CUDA_ARCH_FLAGS = [
    "-gencode arch=compute_80,code=sm_80",
    "-gencode arch=compute_90,code=sm_90",
    "-gencode arch=compute_90,code=compute_90",
]

def cuda_object(name, src, hdrs = [], **kwargs):
    if not CUDA_FOUND:
        return
    native.genrule(
        name = name,
        srcs = [src] + hdrs,
        outs = [name + ".pic.o"],
        cmd = " ".join([
            NVCC,
            "-c -O3 -std=c++17",
            "-Xcompiler -fPIC -Xcompiler -Wall",
        ] + CUDA_ARCH_FLAGS + [
            "-I.",
            "-o $@",
            "$(location %s)" % src,
        ]),
        message = "nvcc %s" % src,
        **kwargs
    )
