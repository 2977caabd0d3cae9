"""SNLI-VE and NLVR2 evaluation: class logits for a dataset, and accuracy as the official scripts compute it
(correct predictions / records) with per-class accuracy and the confusion matrix besides."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from albef.device import autocast
from albef.distributed import evaluation_share, gather_rows


@dataclass
class ClassifyResult:
    logits: torch.Tensor  # (N, classes), float32, in dataset order
    seconds: float

    @property
    def predictions(self) -> list[int]:
        return self.logits.argmax(dim=1).tolist()


@torch.no_grad()
def classify(
    model,
    dataset,
    collate,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    amp_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> ClassifyResult:
    """The class logits of every record of ``dataset`` (the official ``train=False`` forward, eval mode).

    Under a process group each rank classifies a contiguous share and every rank returns all the logits, in
    dataset order; every rank must call it.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    mine = Subset(dataset, evaluation_share(len(dataset), "records"))
    loader = DataLoader(
        mine, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate
    )
    started = time.perf_counter()
    chunks = []
    try:
        for batch in tqdm(loader, desc="classify", unit="batch", disable=not progress, dynamic_ncols=True):
            with autocast(device, amp_dtype):
                logits = model.logits(
                    batch["images"].to(device),
                    batch["input_ids"].to(device),
                    batch["attention_mask"].to(device),
                )
            chunks.append(logits.float())
    finally:
        model.train(was_training)
    # gathered on the device (NCCL gathers CUDA tensors); a share is empty when there are more ranks than records
    logits = gather_rows(torch.cat(chunks) if chunks else torch.empty(0, device=device))
    return ClassifyResult(logits.cpu(), time.perf_counter() - started)


def accuracy_metrics(labels: list[int], predictions: list[int], names: list[str]) -> dict:
    """``accuracy`` (%), ``per_class`` {name: {"accuracy" (% of that class's records), "records"}} and the
    ``confusion`` matrix {true name: {predicted name: count}}."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    n = len(labels)
    correct = sum(int(a == b) for a, b in zip(labels, predictions, strict=True))
    per_class, confusion = {}, {}
    for c, name in enumerate(names):
        mine = [p for label, p in zip(labels, predictions, strict=True) if label == c]
        per_class[name] = {
            "accuracy": round(100 * sum(p == c for p in mine) / len(mine), 3) if mine else None,
            "records": len(mine),
        }
        confusion[name] = {other: sum(p == k for p in mine) for k, other in enumerate(names)}
    return {
        "accuracy": round(100 * correct / n, 3) if n else 0.0,
        "correct": correct,
        "records": n,
        "per_class": per_class,
        "confusion": confusion,
        "majority_baseline": round(
            100 * max((v["records"] for v in per_class.values()), default=0) / max(n, 1), 3
        ),
    }
