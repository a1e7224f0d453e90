"""Build of maskaq and its extension maskaq._C.

A CUDAExtension is built when a real CUDA toolkit is found, else a CppExtension.
MASKAQ_CUDA=0|1 forces the choice; TORCH_CUDA_ARCH_LIST overrides the default archs.
"""
import glob
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
DEFAULT_ARCHS = "8.0;9.0"


def _toolkit_of(nvcc_path):
    """The toolkit root behind an nvcc, following symlinks and `exec` wrapper scripts."""
    path = Path(os.path.realpath(nvcc_path))
    try:
        head = path.read_bytes()[:4096]
    except OSError:
        return None
    if head.startswith(b"#!"):  # a shell wrapper: find the nvcc it execs
        for token in head.decode(errors="ignore").split():
            token = token.strip("\"'")
            if token.endswith("/nvcc") and Path(token).resolve() != path:
                return _toolkit_of(token)
        return None
    root = path.parent.parent
    return root if _has_cudart(root) else None


def _has_cudart(root):
    return any((Path(root) / lib).glob("libcudart.so*") for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))


def find_cuda_home():
    """A CUDA toolkit root that really holds nvcc and libcudart, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(Path(os.environ[var]) / "bin" / "nvcc")
    if shutil.which("nvcc"):
        candidates.append(Path(shutil.which("nvcc")))
    candidates += [Path("/usr/local/cuda/bin/nvcc")] + [Path(p) for p in sorted(glob.glob("/usr/local/cuda-*/bin/nvcc"), reverse=True)]
    for nvcc in candidates:
        if nvcc.exists():
            root = _toolkit_of(nvcc)
            if root is not None:
                return str(root)
    return None


def want_cuda(cuda_home):
    forced = os.environ.get("MASKAQ_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"MASKAQ_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and cuda_home is None:
        sys.exit("MASKAQ_CUDA=1 but no CUDA toolkit (nvcc + libcudart) was found; set CUDA_HOME.")
    return forced == "1" or (forced != "0" and cuda_home is not None)


def nvidia_wheel_includes(headers):
    """Include dirs of pip's nvidia-* packages that hold any of `headers`: torch's CUDA headers
    include cuBLAS/cuSPARSE headers that a bare toolkit may lack."""
    dirs = []
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                if any(os.path.exists(os.path.join(d, h)) for h in headers):
                    dirs.append(d)
    return list(dict.fromkeys(dirs))


def toolkit_lacks(cuda_home, header):
    return not (Path(cuda_home) / "include" / header).exists()


def extensions():
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    use_cuda = want_cuda(cuda_home)
    sources = ["csrc/maskaq.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch adds the -std it needs (C++20 for torch 2.14)
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    if not use_cuda:
        return [cpp_extension.CppExtension("maskaq._C", sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                                           define_macros=define_macros)], False

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch guessed at import time; the wrapper may have fooled it
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS)
    missing = [h for h in ("cublas_v2.h", "cusparse.h") if toolkit_lacks(cuda_home, h)]
    if missing:
        include_dirs += nvidia_wheel_includes(missing)
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr"]
    return [cpp_extension.CUDAExtension("maskaq._C", sources, include_dirs=include_dirs,
                                        define_macros=define_macros + [("MASKAQ_WITH_CUDA", None)],
                                        extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                        extra_link_args=["-fopenmp"])], True


def write_build_info(with_cuda):
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if with_cuda else ""
    text = f"# written by setup.py\nWITH_CUDA = {with_cuda!r}\nCUDA_ARCHS = {archs!r}\n"
    (ROOT / "maskaq" / "_build_info.py").write_text(text)


def main():
    from torch.utils.cpp_extension import BuildExtension

    ext_modules, with_cuda = extensions()
    write_build_info(with_cuda)
    print(f"maskaq: building maskaq._C with{'' if with_cuda else 'out'} CUDA "
          f"(archs {os.environ.get('TORCH_CUDA_ARCH_LIST', '-') if with_cuda else '-'})")
    setup(
        packages=find_packages(include=["maskaq", "maskaq.*"]),
        ext_modules=ext_modules,
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
        include_package_data=True,
    )


if __name__ == "__main__":
    main()
