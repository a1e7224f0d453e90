"""Export of a calibrated fake-quant student to integer kernels, and save/load of the result.

    qmodel = quantize_model(teacher, wbits=8, abits=8); calibrate(qmodel, images)
    imodel = export_integer(qmodel)                 # IntLinear / IntAttention / IntConv2d inside
    save_integer(imodel, "out/int_w8a8")            # integer.safetensors + integer.json
    imodel = load_integer("out/int_w8a8", timm.create_model("deit_small_patch16_224"))
    imodel = load_integer("out/int_w8a8")           # the architecture from the saved record

Weights of <= 4 bits are packed two per byte in the saved file (in memory they are int8, the
width of the kernels). Files are written atomically, by rank 0 only under torch.distributed.
"""
from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from maskaq._files import save_tensors_and_json

from maskaq.integer.modules import (DEFAULT_KERNEL, ActGrid, IntAttention, IntConv2d, IntLinear, IntMlp, cpu_integer_path,
                                    set_kernel)

__all__ = ["export_integer", "save_integer", "load_integer", "is_integer", "WEIGHTS_NAME", "CONFIG_NAME"]

WEIGHTS_NAME = "integer.safetensors"
CONFIG_NAME = "integer.json"
FORMAT = "maskaq.integer"
FORMAT_VERSION = 1
PACK_SUFFIX = ".weight_int4"  # state-dict key of a weight packed two 4-bit values per byte


def _quant_types():
    from maskaq.quant.modules import QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention
    from maskaq.quant.quantizers import LsqActQuantizer

    return QuantAttention, QuantConv2d, QuantLinear, QuantWindowAttention, LsqActQuantizer


def _check_exportable(qmodel) -> None:
    from maskaq.quant.convert import check_calibrated_student
    if isinstance(qmodel, nn.Module) and is_integer(qmodel):
        raise ValueError("this model is already an integer model (made by export_integer)")
    check_calibrated_student(qmodel, "export_integer")
    swin = [n for n, m in qmodel.named_modules() if isinstance(m, _quant_types()[3])]
    if swin:
        raise ValueError(f"export_integer does not support Swin window attention yet (at '{swin[0]}'); "
                         "ViT / DeiT students are supported")


def _fusable_mlp(module: nn.Module) -> bool:
    """A timm Mlp whose fc1 → act → fc2 chain IntMlp can run (no norm between, linear layers)."""
    from timm.layers import Mlp

    return (type(module) is Mlp and isinstance(module.fc1, IntLinear) and isinstance(module.fc2, IntLinear)
            and isinstance(module.norm, nn.Identity))


def _convert(module: nn.Module, fold: bool, kernel: str) -> None:
    QuantAttention, QuantConv2d, QuantLinear, _, _ = _quant_types()
    for name, child in list(module.named_children()):
        if isinstance(child, QuantAttention):
            new = IntAttention.from_quant(child, fold=fold, kernel=kernel)
        elif isinstance(child, QuantLinear):
            new = IntLinear.from_quant(child, kernel)
        elif isinstance(child, QuantConv2d):
            new = IntConv2d.from_quant(child)
        else:
            _convert(child, fold, kernel)
            if not _fusable_mlp(child):
                continue
            new = IntMlp(child.fc1, child.fc2, child.act)  # dropouts are identities at inference
        setattr(module, name, new)


def is_integer(model: nn.Module) -> bool:
    return hasattr(model, "maskaq_integer")


@torch.no_grad()
def export_integer(qmodel: nn.Module, *, device: Optional[Union[str, torch.device]] = None,
                   kernel: str = DEFAULT_KERNEL, fold: bool = True) -> nn.Module:
    """Integer copy of a calibrated fake-quant student (``qmodel`` is left untouched).

    device: where the integer model runs (default: where qmodel is). ``kernel``: the CPU int8
    GEMM library, "onednn" (default, fused GELU/requantize epilogues) or "fbgemm" (switch later
    with maskaq.integer.set_kernel); CUDA always uses torch._int_mm. fold=False keeps attention's
    scales out of the qkv/proj epilogues (slower; for checking). Raises TypeError/ValueError for
    a model that is not a calibrated student or uses unsupported settings.
    """
    _check_exportable(qmodel)
    set_kernel(nn.Module(), kernel)  # validates the name before the copy
    imodel = copy.deepcopy(qmodel)
    _convert(imodel, fold, kernel)
    leftover = [n for n, m in imodel.named_modules() if isinstance(m, _quant_types()[4])]
    if leftover:
        raise ValueError(f"quantizer at '{leftover[0]}' sits outside a Linear/Conv/Attention; cannot export it")
    config = dict(getattr(qmodel, "maskaq_quant", {}) or {})
    if hasattr(imodel, "maskaq_quant"):
        del imodel.maskaq_quant
    # which CPU int8 path this machine takes (split weights where its GEMMs clip pair sums)
    imodel.maskaq_integer = {"quant": config, "cpu_path": cpu_integer_path()}
    imodel.requires_grad_(False)
    imodel.eval()
    if device is None:  # new buffers (attention grids) are made on the CPU: follow the student
        first = next(qmodel.parameters(), None)
        device = first.device if first is not None else None
    if device is not None:
        imodel.to(device)
    return imodel


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def pack_int4(w: torch.Tensor) -> torch.Tensor:
    """(rows, cols) int8 in [-8, 7] -> (rows, ceil(cols/2)) uint8, low nibble = even column."""
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError("pack_int4 takes a 2-D int8 tensor")
    if int(w.min()) < -8 or int(w.max()) > 7:
        raise ValueError("pack_int4 takes values in [-8, 7]")
    u = (w.to(torch.int16) & 0xF).to(torch.uint8)
    if u.shape[1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[:, 0::2] | (u[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor, cols: int) -> torch.Tensor:
    low = (packed & 0xF).to(torch.int16)
    high = (packed >> 4).to(torch.int16)
    u = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :cols]
    return torch.where(u > 7, u - 16, u).to(torch.int8)


def _module_specs(imodel: nn.Module) -> dict:
    specs = {}
    for name, m in imodel.named_modules():
        if isinstance(m, IntAttention):
            specs[name] = {"kind": "attention", "num_heads": m.num_heads, "head_dim": m.head_dim,
                           "scale": m.scale, "gate": m.gate is not None}
        elif isinstance(m, IntMlp):
            specs[name] = {"kind": "mlp"}
        elif isinstance(m, IntLinear):
            specs[name] = {"kind": "linear", "in": m.in_features, "out": m.out_features, "wbits": m.wbits,
                           "quantized_input": m.quantized_input, "kernel": m.kernel}
        elif isinstance(m, IntConv2d):
            specs[name] = {"kind": "conv", "in": m.in_channels, "out": m.out_channels,
                           "kernel_size": list(m.kernel_size), "stride": list(m.stride),
                           "padding": list(m.padding), "dilation": list(m.dilation), "groups": m.groups,
                           "wbits": m.wbits, "quantized_input": m.quantized_input}
    return specs


def save_integer(imodel: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write an integer model (from export_integer) to ``directory``; returns the directory."""

    if not is_integer(imodel):
        raise ValueError("save_integer needs a model made by export_integer")
    specs = _module_specs(imodel)
    state = {}
    for key, t in imodel.state_dict().items():
        t = t.detach().cpu().contiguous()
        owner = key.rsplit(".", 1)[0]
        spec = specs.get(owner)
        if key.endswith(".weight_int") and spec and spec["wbits"] <= 4 and t.dim() == 2:
            state[owner + PACK_SUFFIX] = pack_int4(t)
        elif key.endswith(".weight_int") and spec and spec["wbits"] <= 4:  # conv: pack its 2-D view
            state[owner + PACK_SUFFIX] = pack_int4(t.reshape(t.shape[0], -1))
        else:
            state[key] = t
    from maskaq.quant.io import model_source

    pretrained = getattr(imodel, "pretrained_cfg", None) or {}
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION,
            "class": f"{type(imodel).__module__}.{type(imodel).__qualname__}",
            "timm_name": pretrained.get("architecture"),
            "quant": imodel.maskaq_integer.get("quant", {}), "modules": specs, "model": model_source(imodel)}
    return save_tensors_and_json(directory, state, meta, WEIGHTS_NAME, CONFIG_NAME, FORMAT)


def _get(root: nn.Module, name: str) -> nn.Module:
    return root.get_submodule(name) if name else root


def _set(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(_get(root, parent), child, module)


def _skeleton(fp: nn.Module, name: str, spec: dict, specs: dict) -> nn.Module:
    """An empty integer module for ``spec`` in place of the float module ``fp`` (checked)."""
    placeholder = ActGrid(1.0, 0, 0, 255, 8)
    kind = spec["kind"]
    if kind == "linear":
        if not isinstance(fp, nn.Linear) or (fp.in_features, fp.out_features) != (spec["in"], spec["out"]):
            raise ValueError(f"'{name}': saved Linear {spec['in']}->{spec['out']} does not match the model's "
                             f"{type(fp).__name__}; pass the architecture the integer model was exported from")
        return IntLinear(spec["in"], spec["out"], spec["wbits"], placeholder if spec["quantized_input"] else None,
                         spec.get("kernel", DEFAULT_KERNEL))
    if kind == "conv":
        if not isinstance(fp, nn.Conv2d) or (fp.in_channels, fp.out_channels) != (spec["in"], spec["out"]):
            raise ValueError(f"'{name}': saved Conv2d does not match the model's {type(fp).__name__}")
        return IntConv2d(spec["in"], spec["out"], spec["kernel_size"], spec["stride"], spec["padding"],
                         spec["dilation"], spec["groups"], spec["wbits"],
                         placeholder if spec["quantized_input"] else None)
    if kind == "attention":
        if not hasattr(fp, "qkv") or getattr(fp, "num_heads", None) != spec["num_heads"]:
            raise ValueError(f"'{name}': saved attention with {spec['num_heads']} heads does not match the "
                             f"model's {type(fp).__name__}")
        qkv = _skeleton(fp.qkv, name + ".qkv", specs[name + ".qkv"], specs)
        proj = _skeleton(fp.proj, name + ".proj", specs[name + ".proj"], specs)
        gate = _skeleton(fp.gate, name + ".gate", specs[name + ".gate"], specs) if spec["gate"] else None
        return IntAttention(spec["num_heads"], spec["head_dim"], spec["scale"], qkv, proj, (placeholder,) * 4,
                            getattr(fp, "q_norm", None), getattr(fp, "k_norm", None), getattr(fp, "norm", None),
                            gate)
    if kind == "mlp":
        if not (hasattr(fp, "fc1") and hasattr(fp, "fc2") and hasattr(fp, "act")):
            raise ValueError(f"'{name}': saved Mlp does not match the model's {type(fp).__name__}")
        fc1 = _skeleton(fp.fc1, name + ".fc1", specs[name + ".fc1"], specs)
        fc2 = _skeleton(fp.fc2, name + ".fc2", specs[name + ".fc2"], specs)
        return IntMlp(fc1, fc2, fp.act)
    raise ValueError(f"unknown module kind {kind!r} in the saved integer config")


@torch.no_grad()
def load_integer(directory: Union[str, os.PathLike], model: Optional[nn.Module] = None,
                 device: Optional[Union[str, torch.device]] = None) -> nn.Module:
    """Rebuild an integer model saved by save_integer on ``model`` (the full-precision architecture
    it was exported from; its weights are not used). Without ``model``, the architecture the folder
    records is built. Raises ValueError on a mismatch."""
    from safetensors.torch import load_file

    directory = Path(directory)
    for path in (directory / CONFIG_NAME, directory / WEIGHTS_NAME):
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: load_integer needs a directory written by save_integer")
    try:
        meta = json.loads((directory / CONFIG_NAME).read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{directory / CONFIG_NAME} is not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / CONFIG_NAME} is not a maskaq integer-model config "
                         f"(format {FORMAT!r} version {FORMAT_VERSION})")
    if model is None:
        from maskaq.quant.io import model_from_source
        model = model_from_source(meta.get("model"), directory)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_integer needs the full-precision model (nn.Module), got {type(model).__name__}")
    if is_integer(model) or hasattr(model, "maskaq_quant"):
        raise ValueError("pass the full-precision model to load_integer, not a quantized or integer one")
    class_name = f"{type(model).__module__}.{type(model).__qualname__}"
    if class_name != meta["class"]:
        raise ValueError(f"the integer model was exported from {meta['class']}, got {class_name}")
    specs = meta["modules"]
    imodel = copy.deepcopy(model)
    for name, spec in specs.items():
        parent = name.rpartition(".")[0]
        if parent in specs and specs[parent]["kind"] in ("attention", "mlp"):
            continue  # built with its attention / mlp
        try:
            fp = _get(imodel, name)
        except AttributeError:
            raise ValueError(f"the model has no module '{name}' saved in {directory}; wrong architecture") from None
        _set(imodel, name, _skeleton(fp, name, spec, specs))
    state = load_file(str(directory / WEIGHTS_NAME))
    for key in [k for k in state if k.endswith(PACK_SUFFIX)]:
        owner = key[: -len(PACK_SUFFIX)]
        target = _get(imodel, owner).weight_int
        w = unpack_int4(state.pop(key), target[0].numel())
        state[owner + ".weight_int"] = w.reshape(target.shape)
    wanted = imodel.state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(set(state) - set(wanted))
    reshaped = [k for k in set(wanted) & set(state) if wanted[k].shape != state[k].shape]
    if missing or unexpected or reshaped:
        what = (f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected
                else f"shape of {reshaped[0]}: saved {list(state[reshaped[0]].shape)} vs {list(wanted[reshaped[0]].shape)}")
        raise ValueError(f"{directory} does not match the given architecture ({what}); "
                         "pass the model the integer model was exported from")
    imodel.load_state_dict(state, strict=True)
    imodel.maskaq_integer = {"quant": meta.get("quant", {}), "cpu_path": cpu_integer_path()}
    imodel.requires_grad_(False)
    imodel.eval()
    if device is not None:
        imodel.to(device)
    return imodel

