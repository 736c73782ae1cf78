"""Builds the one extension, ``ftcore._C``, against the torch already installed.

C++ sources (``csrc/**/*.cpp``) are always compiled. CUDA sources (``csrc/**/*.cu``) are compiled when torch
was built with CUDA and a toolkit is found; no GPU is needed. Switches (environment variables):

    FTCORE_CUDA=0|1        force the CUDA kernels off / on (on fails loudly when they cannot be built)
    FTCORE_CUDA_ARCHS      target architectures, default "80;90" (A100, H100/H200)
    MAX_JOBS               parallel compile jobs (default: what cores and free memory allow)
"""

import glob
import os
import re
import shutil

ROOT = os.path.dirname(os.path.abspath(__file__))


def _locate_cuda_toolkit() -> None:
    """torch guesses CUDA_HOME as the parent of the folder holding `nvcc`; where `nvcc` is a wrapper script
    (say /usr/local/bin/nvcc) that guess has no headers or libraries. Point CUDA_HOME at a real toolkit."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    guesses = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    guesses += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True)]
    for home in guesses:
        if os.path.isfile(os.path.join(home, "include", "cuda_runtime.h")) and os.path.isfile(os.path.join(home, "bin", "nvcc")):
            os.environ["CUDA_HOME"] = home
            return


_locate_cuda_toolkit()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
from setuptools import setup  # noqa: E402
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _cuda_wanted() -> bool:
    forced = os.environ.get("FTCORE_CUDA")
    possible = torch.version.cuda is not None and CUDA_HOME is not None
    if forced == "0":
        return False
    if forced == "1":
        if not possible:
            raise RuntimeError(
                "FTCORE_CUDA=1 but the CUDA kernels cannot be built: "
                f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}. "
                "Install a CUDA build of torch and the CUDA toolkit (nvcc)."
            )
        return True
    if forced not in (None, ""):
        raise RuntimeError(f"FTCORE_CUDA must be 0 or 1, got {forced!r}")
    return possible


def _default_max_jobs() -> int:
    # nvcc processes can take several GB each; bound jobs by cores and by free memory (about 4 GB a job).
    cores = os.cpu_count() or 1
    try:
        with open("/proc/meminfo") as f:
            avail_kb = int(re.search(r"MemAvailable:\s+(\d+)", f.read()).group(1))
        by_memory = max(1, avail_kb // (4 * 1024 * 1024))
    except (OSError, AttributeError):
        by_memory = 1
    return max(1, min(cores, by_memory))


def _cuda_arch_list() -> str:
    archs = os.environ.get("FTCORE_CUDA_ARCHS", "80;90")
    out = []
    for a in archs.replace(",", ";").split(";"):
        a = a.strip()
        if not re.fullmatch(r"\d{2,3}a?", a):
            raise RuntimeError(f"FTCORE_CUDA_ARCHS entries look like 80 or 90a, got {a!r}")
        out.append(f"{a[:-1]}.{a[-1]}" if not a.endswith("a") else f"{a[:-2]}.{a[-2:]}")
    return ";".join(out)


def _extension():
    with_cuda = _cuda_wanted()
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    define = [f"-DFTCORE_TORCH_VERSION={torch.__version__}", f"-DFTCORE_WITH_CUDA={int(with_cuda)}"]
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    cxx = ["-O3", "-std=c++20", "-fopenmp", "-fvisibility=hidden", *define]
    # -fopenmp links libgomp.so.1 by soname: the copy torch already loaded serves us, so one OpenMP runtime runs.
    link = ["-fopenmp"]
    # The limited CPython API (torch adds -DPy_LIMITED_API for 3.10) and no libtorch_python: the module is
    # _C.abi3.so and the wheel is tagged cp310-abi3, so one build serves every Python >= 3.10 with this torch.
    if not with_cuda:
        return CppExtension(
            "ftcore._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx}, extra_link_args=link, py_limited_api=True,
        )
    sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", _cuda_arch_list())
    # The pip CUDA wheels of torch keep the CUDA headers (cuda_runtime.h, cublas, ...) inside site-packages.
    for site in {os.path.dirname(os.path.dirname(torch.__file__))}:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cublas/include"):
            path = os.path.join(site, sub)
            if os.path.isdir(path):
                include_dirs.append(path)
    nvcc = ["-O3", "-std=c++20", "--expt-relaxed-constexpr", "-lineinfo", *define]
    return CUDAExtension(
        "ftcore._C", sources, include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link, py_limited_api=True,
    )


class BuildExt(BuildExtension.with_options(use_ninja=True)):
    """Keeps object files apart per torch build (CPU and CUDA builds of one checkout do not overwrite each other)."""

    def finalize_options(self):
        super().finalize_options()
        variant = torch.__version__.replace("+", "-")
        self.build_temp = os.path.join(ROOT, "build", f"temp-torch-{variant}")


os.environ.setdefault("MAX_JOBS", str(_default_max_jobs()))
torch_release = torch.__version__.split("+")[0]

setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExt},
    options={"bdist_wheel": {"py_limited_api": "cp310"}},
    # The compiled extension only loads into the torch release it was built against.
    install_requires=[f"torch=={torch_release}", "numpy", "safetensors", "transformers>=4.40"],
)
