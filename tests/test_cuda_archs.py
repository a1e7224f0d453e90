"""Which GPUs the CUDA build runs on, and the fallback on the others, tested on the CPU.

The GPU's compute capability and the archs of the build are faked (monkeypatch), so these run
without a GPU: a GPU that no SASS of its major version and no PTX at or below it covers makes the
ops warn once and take the plain-PyTorch reference instead of failing with "no kernel image".
"""
import sys
import types
import warnings

import pytest
import torch

from maskaq import _extension, ops
from maskaq._extension import arch_runs_on

DEFAULT_SASS, DEFAULT_PTX = ["8.0", "9.0", "10.0", "12.0"], ["12.0"]  # setup.py's default with nvcc 13


@pytest.mark.parametrize("capability,runs", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True), ((9, 0), True), ((10, 0), True), ((10, 3), True),
    ((12, 0), True), ((12, 1), True), ((13, 0), True),  # a newer GPU JIT-compiles the 12.0 PTX
    ((7, 5), False), ((11, 0), False),  # Turing; Thor's 11.0 lies below the PTX and has no binary
])
def test_default_archs_cover_ampere_to_blackwell(capability, runs):
    assert arch_runs_on(capability, DEFAULT_SASS, DEFAULT_PTX) is runs


def test_arch_rules():
    assert not arch_runs_on((10, 0), ["8.0", "9.0"], [])  # the old default on a B200
    assert arch_runs_on((10, 0), ["8.0"], ["9.0"])  # PTX below the GPU is JIT-compiled
    assert not arch_runs_on((8, 6), ["9.0"], ["9.0"])  # neither binary nor PTX reaches down
    assert not arch_runs_on((8, 0), ["8.6"], [])  # a binary does not run below its minor version
    assert arch_runs_on((9, 0), ["9.0a"], []) and not arch_runs_on((9, 1), ["9.0a"], [])  # arch-specific
    assert arch_runs_on((10, 3), ["10.0f"], [])  # family-specific binary
    assert arch_runs_on((10, 3), [], ["10.0a"]) is False and arch_runs_on((10, 0), [], ["10.0a"])


@pytest.fixture
def fake_cuda_build(monkeypatch):
    """An extension built with CUDA for `archs` (TORCH_CUDA_ARCH_LIST form) on a GPU of `capability`;
    clears the per-device cache and the once-only warning around each test."""
    def fake(archs, capability):
        build_info = types.SimpleNamespace(WITH_CUDA=True, CUDA_ARCHS=archs)  # no CUDA_SASS: parsed from CUDA_ARCHS
        monkeypatch.setitem(sys.modules, "maskaq._build_info", build_info)
        monkeypatch.setattr(_extension, "_module", types.SimpleNamespace(with_cuda=True))
        monkeypatch.setattr(_extension, "_cuda_runs", {})
        monkeypatch.setattr(_extension, "_warned_cuda_arch", False)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
        monkeypatch.delenv("MASKAQ_REQUIRE_EXTENSION", raising=False)
    return fake


def cuda_like(dtype=torch.float32, index=0):
    """Stands in for a CUDA tensor: uses_extension reads only .device and .dtype."""
    return types.SimpleNamespace(device=torch.device("cuda", index), dtype=dtype)


def test_extension_info_reports_sass_and_ptx(fake_cuda_build):
    fake_cuda_build("8.0;9.0;10.0;12.0+PTX", (9, 0))
    info = _extension.extension_info()
    assert info["cuda_archs"] == ["8.0", "9.0", "10.0", "12.0+PTX"]
    assert info["cuda_sass"] == DEFAULT_SASS and info["cuda_ptx"] == DEFAULT_PTX


def test_extension_info_prefers_the_recorded_gencodes(fake_cuda_build, monkeypatch):
    fake_cuda_build("Hopper", (9, 0))
    monkeypatch.setattr(sys.modules["maskaq._build_info"], "CUDA_SASS", ("9.0",), raising=False)
    monkeypatch.setattr(sys.modules["maskaq._build_info"], "CUDA_PTX", ("9.0",), raising=False)
    info = _extension.extension_info()
    assert info["cuda_sass"] == ["9.0"] and info["cuda_ptx"] == ["9.0"]


def test_supported_gpu_runs_the_kernels_without_warning(fake_cuda_build):
    fake_cuda_build("8.0;9.0;10.0;12.0+PTX", (10, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.uses_extension(cuda_like())
        assert ops.integer_kernels_available("cuda")


def test_unsupported_gpu_warns_once_and_falls_back(fake_cuda_build):
    fake_cuda_build("8.0;9.0", (10, 0))  # the old default on a Blackwell GPU
    with pytest.warns(RuntimeWarning, match=r"compute capability 10\.0.*sm_8\.0, sm_9\.0.*TORCH_CUDA_ARCH_LIST"):
        assert not ops.uses_extension(cuda_like())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only, for every op and dtype
        assert not ops.uses_extension(cuda_like(torch.float16))
        assert not ops.integer_kernels_available(torch.device("cuda", 0))
        assert not ops.integer_kernels_available("cuda")


def test_unsupported_gpu_with_required_extension_raises(fake_cuda_build, monkeypatch):
    fake_cuda_build("8.0;9.0", (12, 0))
    monkeypatch.setenv("MASKAQ_REQUIRE_EXTENSION", "1")
    with pytest.raises(RuntimeError, match="no CUDA code for this GPU"):
        ops.uses_extension(cuda_like())


def test_the_check_is_per_device(fake_cuda_build, monkeypatch):
    fake_cuda_build("8.0;9.0+PTX", (9, 0))
    capabilities = {0: (9, 0), 1: (7, 5)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capabilities[index])
    assert ops.uses_extension(cuda_like(index=0))
    with pytest.warns(RuntimeWarning, match="cuda:1"):
        assert not ops.uses_extension(cuda_like(index=1))
    assert ops.uses_extension(cuda_like(index=0))


def test_fq_attention_falls_back_to_the_reference(fake_cuda_build, monkeypatch):
    """The op's dispatch: on an unsupported GPU the call goes to maskaq.reference, not the kernel
    (a CPU tensor plays the CUDA one: only the device check of uses_extension is redirected)."""
    fake_cuda_build("8.0;9.0", (12, 0))
    real_uses_extension = ops.uses_extension
    monkeypatch.setattr(ops, "uses_extension", lambda t: real_uses_extension(cuda_like(t.dtype)))
    monkeypatch.setattr(ops.reference, "fq_attention", lambda *args, **kwargs: ("reference", None))
    monkeypatch.setattr(torch.ops.maskaq, "fq_attention", None, raising=False)  # calling it would fail
    q = torch.randn(1, 2, 5, 8)
    with pytest.warns(RuntimeWarning, match="no CUDA code"):
        assert ops.fq_attention(q, q, q) == ("reference", None)
