"""Build lkfast and its compiled extension lkfast._C.

The C++ CPU kernels are always built. CUDA kernels (csrc/cuda/*.cu) are built too when nvcc and
a CUDA build of torch are both present (TORCH_CUDA_ARCH_LIST is respected; default "8.0;9.0").
Environment switches:
  LKFAST_NO_CUDA=1      build the CPU kernels only
  LKFAST_REQUIRE_EXT=1  fail the install if the extension does not build (CI sets it); otherwise a
                        failed build leaves a pure-Python install that falls back to PyTorch and says
                        so in lkfast.ops.available_backends()
  MAX_JOBS=N            parallel compile jobs (ninja)
  LKFAST_PREBUILT=1     build nothing: keep the lkfast/_C*.so already in the checkout (one carried to a
                        machine where compiling costs its scarce time, as benchmarks/gpu_check.sh does)
Beside the built extension, _C.<abi>.sources records which csrc/ it was built from (lkfast._sources);
importing lkfast from a checkout whose csrc/ has changed since then warns that the build is stale.
An assembler older than binutils 2.32 builds the CPU kernels without their AVX512-BF16 bf16 path
(lkfast/_toolchain.py); lkfast.ops.available_backends() then says so.
Install with `pip install --no-build-isolation -e .` so the build uses the torch already installed.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _pip_cuda_include_dirs():
    """Headers of the CUDA libraries that torch's wheel depends on (cuSPARSE, cuBLAS, ...), which
    pip installs under site-packages/nvidia/; a toolkit with nvcc alone may lack them."""
    import site

    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def _set_cuda_home():
    """torch takes the toolkit to be `which nvcc`/../..; where nvcc is a wrapper or a link (here
    /usr/local/bin/nvcc runs /usr/local/cuda-13.0/bin/nvcc) that directory has no libcudart and
    the link step fails. Point CUDA_HOME at a directory that has both, unless the user set it."""
    import shutil

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))] if nvcc else []
    candidates.append("/usr/local/cuda")
    for home in candidates:
        has_nvcc = os.path.exists(os.path.join(home, "bin", "nvcc"))
        has_cudart = glob.glob(os.path.join(home, "lib64", "libcudart.so*")) or glob.glob(
            os.path.join(home, "lib", "libcudart.so*"))
        if has_nvcc and has_cudart:
            os.environ["CUDA_HOME"] = home
            return


def _load(name):
    """lkfast/<name>.py, loaded by path (lkfast is not importable while it is being built)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_lkfast_{name}", os.path.join(ROOT, "lkfast", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sources_module():
    return _load("_sources")


def _recording(build_ext):
    """``build_ext`` that writes, beside each extension it built, the record of its sources (also
    beside the copy an in-place or editable build puts in the checkout)."""
    class RecordingBuildExt(build_ext):
        def build_extension(self, ext):
            sources = _sources_module()
            built_from = sources.source_hash(os.path.join(ROOT, "csrc"))  # before: an edit during the build is stale
            super().build_extension(ext)
            import torch

            sources.write_record(
                self.get_ext_fullpath(ext.name), built_from, torch=torch.__version__,
                with_cuda=any(s.endswith(".cu") for s in ext.sources),
                cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST") if torch.version.cuda else None)

        def copy_extensions_to_source(self):
            super().copy_extensions_to_source()
            sources = _sources_module()
            for ext in self.extensions:
                filename = self.get_ext_filename(self.get_ext_fullname(ext.name))
                built = sources.record_path(os.path.join(self.build_lib, filename))
                if built.is_file():
                    shutil.copyfile(built, sources.record_path(os.path.join(ROOT, filename)))

    return RecordingBuildExt


def _extensions():
    if os.environ.get("LKFAST_PREBUILT", "0") == "1":
        print("lkfast: LKFAST_PREBUILT=1: building nothing, lkfast/_C*.so as it is in the checkout")
        return [], {}
    _set_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("lkfast: torch is not importable at build time; installing without lkfast._C")
        return [], {}

    required = os.environ.get("LKFAST_REQUIRE_EXT", "0") == "1"
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=fast"]
    macros = []
    if not _load("_toolchain").assembles_vdpbf16ps():
        print("lkfast: the assembler cannot encode vdpbf16ps (binutils < 2.32): building without the "
              "AVX512-BF16 bf16 kernels (bf16 on the CPU runs on the AVX-512 FMA path)")
        macros.append(("LKFAST_NO_VDPBF16PS", None))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    want_cuda = (
        os.environ.get("LKFAST_NO_CUDA", "0") != "1"
        and torch.version.cuda is not None
        and CUDA_HOME is not None
        and bool(cuda_sources)
    )
    if want_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        include_dirs = [os.path.join(ROOT, "csrc")] + _pip_cuda_include_dirs()
        macros.append(("LKFAST_WITH_CUDA", None))
        ext = CUDAExtension(
            "lkfast._C",
            sources + cuda_sources,
            define_macros=macros,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--use_fast_math", "-lineinfo",
                         "--expt-relaxed-constexpr"],
            },
            extra_link_args=["-fopenmp"],
            include_dirs=include_dirs,
        )
    else:
        ext = CppExtension(
            "lkfast._C",
            sources,
            define_macros=macros,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
            include_dirs=[os.path.join(ROOT, "csrc")],
        )
    ext.optional = not required
    # headers hold kernel code (csrc/cpu/dwconv_kernel.h): an edit to one rebuilds without ninja too
    ext.depends = sorted(glob.glob("csrc/**/*.h", recursive=True) + glob.glob("csrc/**/*.cuh", recursive=True))
    return [ext], {"build_ext": _recording(BuildExtension.with_options(use_ninja=True))}


ext_modules, cmdclass = _extensions()

setup(
    name="lkfast",
    version="0.1.0",
    description="Fast large-kernel depthwise convolution and the large-kernel ConvNet robustness protocol",
    long_description=open(os.path.join(ROOT, "README.md")).read() if os.path.exists(os.path.join(ROOT, "README.md")) else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["lkfast", "lkfast.*"]) + ["lkfast.kernels"],
    package_dir={"lkfast.kernels": "kernels"},
    package_data={"lkfast.ops": ["cuda_table.json", "cpu_table.json"],  # the measured dispatch tables (CUDA, CPU)
                  "lkfast.data": ["in_to_in9.json"]},  # the backgrounds-challenge 1000 -> 9 class map
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "numpy",
        "tqdm>=4.60",  # (delay=: the data-file bar)
        "matplotlib",
        "scikit-learn",
        "safetensors",
        "imagecorruptions-imaug",  # the frost photographs of ImageNet-C
        "av",  # ImageNet-P mp4 sequences
    ],
    extras_require={
        "test": ["pytest", "pytest-benchmark", "ninja"],
        "triton": ["triton"],
    },
    zip_safe=False,
)
