"""Top-1/top-5 accuracy of a model on a dataset or loader (`maskaq eval` is maskaq/commands/eval.py)."""
from __future__ import annotations

import sys
from typing import Dict, Optional

import torch
from torch import nn

__all__ = ["evaluate", "evaluate_model"]


def _as_loader(data, batch_size: int = 256):
    """DataLoaders and other iterables of (images, labels) pass through; a Dataset is batched."""
    from torch.utils.data import DataLoader, Dataset
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _model_device(model: torch.nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def evaluate(model: torch.nn.Module, loader, device=None, progress: bool = True) -> dict:
    """Top-1 and top-5 accuracy in percent: {"top1": float, "top5": float}.

    `loader` yields (images, labels) batches (a DataLoader or any iterable; a map-style Dataset is
    batched for you). Runs under no_grad in eval mode and restores the model's previous mode.
    With fewer than 5 classes, top5 counts the top-num_classes predictions (always 100%).
    `device`: where to run (default: the model's device); the model is moved there.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    device = torch.device(device) if device is not None else _model_device(model)
    loader = _as_loader(loader)
    was_training = model.training
    model.to(device).eval()
    correct1 = correct5 = total = 0
    try:
        from tqdm import tqdm
        total_batches = len(loader) if hasattr(loader, "__len__") else None
        with torch.no_grad():
            for batch in tqdm(loader, total=total_batches, desc="eval", disable=not progress,
                              leave=False, dynamic_ncols=True):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise ValueError("the loader must yield (images, labels) batches")
                images, labels = batch[0].to(device), torch.as_tensor(batch[1]).to(device)
                logits = model(images)
                if isinstance(logits, (tuple, list)):  # e.g. distilled heads in train-style output
                    logits = logits[0]
                if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
                    raise ValueError(f"expected logits (batch, classes) for {labels.shape[0]} labels, "
                                     f"got {tuple(logits.shape)}")
                k = min(5, logits.shape[1])
                topk = logits.topk(k, dim=1).indices
                hits = topk == labels[:, None]
                correct1 += hits[:, 0].sum().item()
                correct5 += hits.any(dim=1).sum().item()
                total += labels.shape[0]
    finally:
        model.train(was_training)
    if total == 0:
        raise ValueError("the loader yielded no samples")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total}


def evaluate_model(model: nn.Module, dataset, limit: Optional[int] = None, batch_size: int = 256,
                   progress: Optional[bool] = None) -> Dict[str, float]:
    """Top-1/top-5 (%) of `model` on `dataset` (first `limit` items)."""
    from torch.utils.data import DataLoader, Subset
    if limit is not None:
        dataset = Subset(dataset, range(min(int(limit), len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    if progress is None:  # a bar only where someone watches
        progress = sys.stderr.isatty()
    return evaluate(model, loader, progress=bool(progress))
