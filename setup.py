"""Build dycon_kernels._C: the C++ CPU kernels always, the CUDA kernels when we can.

CUDA is built when torch is a CUDA build and nvcc is found. DYCON_FORCE_CUDA=1 makes a
missing toolkit an error; DYCON_SKIP_CUDA=1 builds the CPU part only (faster local builds).
TORCH_CUDA_ARCH_LIST picks the GPU architectures (default below).

Compiled objects are kept in ``build/`` (not in the temporary folder pip gives each build), so
a second ``pip install -e .`` with unchanged sources recompiles nothing: ninja compares them.

The extension's file name carries the torch build (``_C.torch2_14_1_cu130.cpython-312-...so``,
dycon_kernels/_build.py) and a ``.build.json`` next to it records what it was built with, so that
environments sharing one checkout keep their own builds and the loader can say which torch a
build that no longer loads was made for.
"""
import datetime
import glob
import importlib.util
import json
import os
import platform
import shutil
import sys

from setuptools import find_packages, setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_names():
    """dycon_kernels/_build.py by path: importing the package needs the extension being built."""
    spec = importlib.util.spec_from_file_location("_dycon_build", os.path.join(ROOT, "dycon_kernels", "_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD_NAMES = _load_build_names()
# Ampere (A100, RTX 30), Ada (RTX 40, L4), Hopper; +PTX lets newer GPUs JIT-compile the sm_90 code.
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"
# dycon-<cmd> runs python -m dycon.<cmd> (nnU-Net users type nnUNetv2_train; ours is dycon-train);
# dycon-env is python -m dycon_kernels's report, from dycon.env so that its --help needs no torch
CONSOLE_SCRIPTS = ("train", "predict", "evaluate", "preprocess", "experiment", "plot", "env")


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
    """torch's BuildExtension with a persistent object folder per Python and torch, a file name
    per torch build, and a build record next to the extension."""

    def finalize_options(self):
        super().finalize_options()
        import torch

        # pip hands every (editable) build a fresh temporary build_temp, so ninja would
        # recompile everything; in build/ its log and depfiles survive between installs.
        self.build_temp = os.path.join(ROOT, "build", f"temp-py{sys.version_info[0]}{sys.version_info[1]}-"
                                                      f"{BUILD_NAMES.torch_tag(torch.__version__)}")
        self._built = {}

    def get_ext_filename(self, ext_name):
        import torch

        folder, name = os.path.split(super().get_ext_filename(ext_name))
        if name.startswith(BUILD_NAMES.STEM + "."):
            name = f"{BUILD_NAMES.STEM}.{BUILD_NAMES.torch_tag(torch.__version__)}{name[len(BUILD_NAMES.STEM):]}"
        return os.path.join(folder, name)

    def build_extension(self, ext):
        super().build_extension(ext)
        path = self.get_ext_fullpath(ext.name)
        BUILD_NAMES.record_path(path).write_text(json.dumps(self._record(ext), indent=1) + "\n")
        self._built[ext.name] = path

    def copy_extensions_to_source(self):
        """In place (editable installs): the record goes next to the copied extension too."""
        super().copy_extensions_to_source()
        for name, built in self._built.items():
            shutil.copyfile(BUILD_NAMES.record_path(built), BUILD_NAMES.record_path(self.get_ext_fullpath(name)))

    def _record(self, ext) -> dict:
        import torch

        with_cuda = ("DYCON_WITH_CUDA", "1") in ext.define_macros
        return {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "cuda_kernels": with_cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if with_cuda else None,
            "cuda_home": os.environ.get("CUDA_HOME") if with_cuda else None,
            "compile_args": ext.extra_compile_args,
            "python": platform.python_version(),
            "python_executable": sys.executable,
            "environment": sys.prefix,
            "platform": platform.platform(),
            "built_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        }


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
        # the tests, and the libraries they check ours against (the MONAI and medpy metrics,
        # nnU-Net's folds and preprocessing): CI installs them so those checks run
        "dev": ["pytest", "hypothesis", "psutil", "monai", "medpy", "nnunetv2"],
        "nnunet": ["nnunetv2"],      # DyCON inside nnU-Net (docs/nnunet.md)
        "monai": ["monai"],          # --hd monai
        "sitk": ["SimpleITK"],       # .nrrd / .mha images
        "nnunet": ["nnunetv2"],      # dycon.nnunet: the nnU-Net v2 trainers (docs/nnunet.md)
    },
    entry_points={"console_scripts": [f"dycon-{cmd}=dycon.{cmd}:console_main" for cmd in CONSOLE_SCRIPTS]},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
