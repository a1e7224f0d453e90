"""Build of maskaq and its extension maskaq._C.

A CUDAExtension is built when a real CUDA toolkit is found, else a CppExtension.
MASKAQ_CUDA=0|1 forces the choice; TORCH_CUDA_ARCH_LIST overrides the default archs.
"""
import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
# SASS for Ampere (8.0, which 8.6/8.7/8.9 also run), Hopper and the two Blackwell families
# (10.0 also runs on 10.3, 12.0 on 12.1), and PTX for the highest, which newer GPUs JIT-compile.
# Archs that this nvcc or this torch does not know are left out, so an older toolkit still builds.
PREFERRED_ARCHS = ("8.0", "9.0", "10.0", "12.0")
FALLBACK_ARCHS = "8.0;9.0+PTX"  # when nvcc cannot list its archs


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


def nvcc_archs(cuda_home):
    """The compute capabilities ("8.0", ...) this toolkit's nvcc compiles for, or None if it cannot say."""
    try:
        out = subprocess.run([str(Path(cuda_home) / "bin" / "nvcc"), "--list-gpu-arch"], capture_output=True,
                             text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    archs = {f"{m[:-1]}.{m[-1]}" for m in re.findall(r"compute_(\d+)\b", out)}
    return archs or None


def torch_accepts_arch(arch):
    """Whether this torch's cpp_extension knows `arch` (torch 2.4 rejects 10.0 and 12.0 outright)."""
    from torch.utils import cpp_extension

    saved = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    try:
        cpp_extension._get_cuda_arch_flags()
        return True
    except (ValueError, AttributeError):
        return False
    finally:
        if saved is None:
            del os.environ["TORCH_CUDA_ARCH_LIST"]
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved


def default_archs(cuda_home):
    """PREFERRED_ARCHS as far as nvcc and torch support them, with +PTX on the highest."""
    known = nvcc_archs(cuda_home)
    if known is None:
        return FALLBACK_ARCHS
    archs = [a for a in PREFERRED_ARCHS if a in known and torch_accepts_arch(a)]
    if not archs:
        return FALLBACK_ARCHS
    return ";".join(archs[:-1] + [archs[-1] + "+PTX"])


def built_archs():
    """(SASS archs, PTX archs) of the gencode flags torch passes to nvcc for TORCH_CUDA_ARCH_LIST,
    e.g. (["8.0", "9.0a"], ["9.0"]); the loader compares them with the GPU's capability."""
    from torch.utils import cpp_extension

    sass, ptx = [], []
    for flag in cpp_extension._get_cuda_arch_flags():
        for kind, digits, suffix in re.findall(r"code=(sm|compute)_(\d+)([a-z]?)", flag):
            arch = f"{digits[:-1]}.{digits[-1]}{suffix}"
            target = sass if kind == "sm" else ptx
            if arch not in target:
                target.append(arch)
    by_capability = lambda a: tuple(int(x) for x in re.match(r"(\d+)\.(\d+)", a).groups())  # noqa: E731
    return sorted(sass, key=by_capability), sorted(ptx, key=by_capability)


def want_cuda(cuda_home):
    forced = os.environ.get("MASKAQ_CUDA")
    if forced not in (None, "", "0", "1"):
        sys.exit(f"MASKAQ_CUDA must be 0 or 1, got {forced!r}")
    if forced == "1" and cuda_home is None:
        sys.exit("MASKAQ_CUDA=1 but no CUDA toolkit (nvcc + libcudart) was found; set CUDA_HOME.")
    return forced == "1" or (forced != "0" and cuda_home is not None)


# Libraries whose headers torch's CUDA headers include and a bare toolkit may lack (pip's nvidia-*
# wheels, torch's own dependencies, carry them): file-name prefix -> the header that tells.
WHEEL_HEADER_FAMILIES = {"cublas": "cublas_v2.h", "cusparse": "cusparse.h", "cusolver": "cusolverDn.h",
                         "curand": "curand.h", "cufft": "cufft.h"}


def nvidia_wheel_includes(families):
    """An include dir with only the headers of `families` (e.g. "cublas") taken from pip's nvidia-*
    packages: the wheel's whole include dir would also bring its CUDA runtime and CCCL headers, which
    nvcc rejects when they are newer than the toolkit (torch 2.15's CUDA 13.2 wheels under nvcc 13.0)."""
    farm = ROOT / "build" / "wheel-cuda-headers"
    shutil.rmtree(farm, ignore_errors=True)
    linked = set()
    for site in sys.path:
        for pattern in ("nvidia/cu*/include", "nvidia/*/include"):
            for d in sorted(glob.glob(os.path.join(site, pattern))):
                for header in sorted(Path(d).iterdir()):
                    if header.name.startswith(families) and header.is_file() and header.name not in linked:
                        farm.mkdir(parents=True, exist_ok=True)
                        (farm / header.name).symlink_to(header)
                        linked.add(header.name)
    return [str(farm)] if linked else []


def toolkit_lacks(cuda_home, header):
    return not (Path(cuda_home) / "include" / header).exists()


def extensions():
    from torch.utils import cpp_extension

    cuda_home = find_cuda_home()
    use_cuda = want_cuda(cuda_home)
    sources = ["csrc/maskaq.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]  # torch adds the -std it needs (C++20 for torch 2.14 and later)
    define_macros = []
    include_dirs = [str(ROOT / "csrc")]
    if not use_cuda:
        return [cpp_extension.CppExtension("maskaq._C", sources, include_dirs=include_dirs,
                                           extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"],
                                           define_macros=define_macros)], False

    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home  # torch guessed at import time; the wrapper may have fooled it
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_archs(cuda_home)
    missing = tuple(f for f, header in WHEEL_HEADER_FAMILIES.items() if toolkit_lacks(cuda_home, header))
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
    sass, ptx = built_archs() if with_cuda else ([], [])
    text = (f"# written by setup.py\nWITH_CUDA = {with_cuda!r}\nCUDA_ARCHS = {archs!r}\n"
            f"CUDA_SASS = {tuple(sass)!r}\nCUDA_PTX = {tuple(ptx)!r}\n")
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
