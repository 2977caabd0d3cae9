"""A linear probe of a pretrained model's fusion: does its fused representation of (image, hypothesis) carry
the SNLI-VE label before any finetuning? Frozen features of the training and dev records (the fused [CLS] and
the mean of the fused tokens), a logistic regression per feature and weight decay, accuracies against the
dev majority class. Set beside the finetuned model's dev accuracy, it tells a representation that lacks the
label from a finetuning that fails to use it.

    python benchmarks/fusion_probe.py --run .          # after dvc repro pretrain (models/, data/processed)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from albef.checkpoint import load_for_task
from albef.data import datasets as ds
from albef.data.classify import ClassificationCollate, ClassificationDataset
from albef.data.transforms import eval_transform
from albef.tokenizer import load_tokenizer


@torch.no_grad()
def features(model, tokenizer, data: Path, split: str, batch: int = 64):
    """(fused [CLS], mean of the fused tokens, labels) of ``ve_<split>.json``."""
    dataset = ClassificationDataset(
        data / f"ve_{split}.json", "ve", ds.image_source(data), eval_transform(model.cfg.vision.image_size)
    )
    collate = ClassificationCollate(tokenizer, 30)
    cls, mean, labels = [], [], []
    for start in range(0, len(dataset), batch):
        b = collate([dataset[i] for i in range(start, min(start + batch, len(dataset)))])
        states = model.fused_states(b["images"], b["input_ids"], b["attention_mask"])
        mask = b["attention_mask"].unsqueeze(-1).float()
        cls.append(states[:, 0])
        mean.append((states * mask).sum(1) / mask.sum(1))
        labels.append(b["targets"])
    return torch.cat(cls), torch.cat(mean), torch.cat(labels)


def logistic_regression(x, y, x_dev, y_dev, weight_decay: float, steps: int = 1000) -> tuple[float, float]:
    """Train and dev accuracy of a linear classifier on standardised features."""
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, x_dev = (x - mu) / sd, (x_dev - mu) / sd
    linear = torch.nn.Linear(x.shape[1], int(y.max()) + 1)
    opt = torch.optim.Adam(linear.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(linear(x), y).backward()
        opt.step()
    with torch.no_grad():
        return (linear(x).argmax(1) == y).float().mean().item(), (
            linear(x_dev).argmax(1) == y_dev
        ).float().mean().item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=".", help="a project folder with models/pretrain and data/processed")
    parser.add_argument("--model", default="models/pretrain", help="the model folder, relative to --run")
    args = parser.parse_args(argv)
    run = Path(args.run)
    torch.manual_seed(0)
    model, _ = load_for_task(run / args.model, "ve")  # the pretrained fusion under a fresh, unused head
    model.eval()
    tokenizer = load_tokenizer(run / args.model / "tokenizer", model.cfg)
    data = run / "data/processed"
    train, dev = features(model, tokenizer, data, "train"), features(model, tokenizer, data, "dev")
    majority = torch.bincount(dev[2]).max().item() / len(dev[2])
    print(f"train {len(train[2])} records, dev {len(dev[2])}; dev majority class {100 * majority:.1f} %")
    for name, k in (("fused [CLS]", 0), ("fused mean", 1)):
        for weight_decay in (0.0, 1e-3, 1e-2, 1e-1):
            fit, held = logistic_regression(train[k], train[2], dev[k], dev[2], weight_decay)
            print(
                f"{name:12s} weight decay {weight_decay:<6} train {100 * fit:.1f} %  dev {100 * held:.1f} %"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
