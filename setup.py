"""Build dycon_kernels._C: the C++ CPU kernels always, the CUDA kernels when we can.

CUDA is built when torch is a CUDA build and nvcc is found. DYCON_FORCE_CUDA=1 makes a
missing toolkit an error; DYCON_SKIP_CUDA=1 builds the CPU part only (faster local builds).
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default below).

Compiled objects are kept in ``build/`` (not in the temporary folder pip gives each build), so
a second ``pip install -e .`` with unchanged sources recompiles nothing: ninja compares them.
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
# Ampere (A100, RTX 30), Ada (RTX 40, L4), Hopper; +PTX lets newer GPUs JIT-compile the sm_90 code.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _flag(name):
    return os.environ.get(name, "0").lower() in ("1", "true", "yes")


def _find_cuda_home():
    """The CUDA toolkit: $CUDA_HOME, /usr/local/cuda, or the folder above nvcc on PATH."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for home in candidates:
        if home and os.path.exists(os.path.join(home, "bin", "nvcc")):
            return home
    return None


def _want_cuda():
    import torch

    if _flag("DYCON_SKIP_CUDA"):
        return False
    home = _find_cuda_home()
    ok = torch.version.cuda is not None and home is not None
    if not ok and _flag("DYCON_FORCE_CUDA"):
        sys.exit(
            "DYCON_FORCE_CUDA=1 but the CUDA part cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, nvcc found at {home!r}"
        )
    if ok:
        os.environ["CUDA_HOME"] = home
        # torch's cpp_extension reads CUDA_HOME at import (and may have guessed another folder).
        cpp_extension.CUDA_HOME = home
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    return ok


def _cuda_include_dirs():
    # The machine's toolkit may lack cuBLAS headers; pip's nvidia wheels ship them.
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "cu[0-9]*", "include"))
    return dirs


def extensions():
    # csrc/cpu_isa_{baseline,avx2,avx512}.cpp set their own target with #pragma GCC target (the hot
    # loops once per vector ISA, picked at run time: docs/engineering.md); no -march flag here, so
    # the rest of the extension runs on any CPU of the architecture.
    cpu_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = ["-fopenmp"] if sys.platform != "darwin" else []
    # No -std flag: torch's cpp_extension picks the standard its headers need (C++20 from 2.10).
    # -fno-trapping-math lets GCC if-convert the branch-free exp/log of csrc/fast_math.h so
    # the voxel loops vectorise; we never rely on floating-point traps or errno.
    cxx = ["-O3", "-fno-trapping-math", "-fno-math-errno"] + openmp
    if _want_cuda():
        sources = cpu_sources + sorted(glob.glob(os.path.join("csrc", "*.cu")))
        return [
            cpp_extension.CUDAExtension(
                "dycon_kernels._C",
                sources,
                include_dirs=[os.path.join(ROOT, "csrc")] + _cuda_include_dirs(),
                # torch may point at its pip CUDA libraries, which lack the unversioned libcudart.so.
                library_dirs=[os.path.join(os.environ["CUDA_HOME"], "lib64")],
                define_macros=[("DYCON_WITH_CUDA", "1")],
                extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                extra_link_args=openmp,
            )
        ]
    return [
        cpp_extension.CppExtension(
            "dycon_kernels._C",
            cpu_sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=openmp,
        )
    ]


class BuildExt(cpp_extension.BuildExtension.with_options(use_ninja=True)):
    """torch's BuildExtension with a persistent object folder, one per Python version."""

    def finalize_options(self):
        super().finalize_options()
        # pip hands every (editable) build a fresh temporary build_temp, so ninja would
        # recompile everything; in build/ its log and depfiles survive between installs.
        self.build_temp = os.path.join(ROOT, "build", f"temp-py{sys.version_info[0]}{sys.version_info[1]}")


setup(
    name="dycon",
    version="0.1.0",
    description="Fused UnCL/FeCL kernels and a trainer for DyCON semi-supervised 3D segmentation",
    packages=find_packages(include=["dycon_kernels", "dycon_kernels.*", "dycon", "dycon.*"]),
    package_data={"dycon": ["configs/*.yaml"]},
    python_requires=">=3.9",
    # everything the default training, evaluation, prediction and benchmark paths import
    install_requires=["torch>=2.4", "numpy", "scipy", "h5py", "nibabel", "pyyaml", "tqdm", "tensorboard",
                      "matplotlib"],
    extras_require={
        "dev": ["pytest", "hypothesis", "psutil"],
        "monai": ["monai"],          # --hd monai
        "sitk": ["SimpleITK"],       # .nrrd / .mha images
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
