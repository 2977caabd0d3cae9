"""How fast can a pair of encoders learn image-text alignment on the synthetic retrieval split from scratch?

A diagnostic, not a test: it trains an image encoder and a text encoder with a plain symmetric CLIP loss
(in-batch negatives, fixed temperature) on ``retrieval_train.json`` and prints the loss and the in-batch
image->text accuracy (chance: 1 / batch). Encoders:

* image: ``vit`` (albef's ImageEncoder, [CLS] feature) or ``cnn`` (three strided convolutions, mean pool)
* text:  ``bert`` (albef's text layers, [CLS] feature) or ``bow`` (mean of word embeddings)

On two CPU cores, 48-px images, batch 32, 400 steps (see the issue 4 notes): cnn+bow, vit+bow and cnn+bert
leave chance, while vit+bert stays at ln(batch) whatever the learning rate, warm-up, pooling, dropout,
temperature or BERT initializer range. One trained encoder is enough to break the deadlock, which is why
the embedded default starts ALBEF from the `unimodal` stage's encoders (albef/train/unimodal.py), as the
official pretraining starts from DeiT and bert-base.

    python benchmarks/alignment_probe.py --image vit --text bert --lr 1e-3
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from albef.config import ModelConfig, VisionConfig
from albef.data.datasets import RetrievalTrainDataset, image_source
from albef.data.transforms import eval_transform
from albef.models.vision import ImageEncoder
from albef.models.xbert import Mode, TextEncoder
from albef.tokenizer import ALBEFTokenizer


class ViTImage(nn.Module):
    def __init__(self, size: int, width: int, dim: int):
        super().__init__()
        self.vit = ImageEncoder(VisionConfig(image_size=size, patch_size=8, width=width, depth=4, heads=4))
        self.proj = nn.Linear(width, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.vit(images)[:, 0])


class CNNImage(nn.Module):
    def __init__(self, width: int, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 64, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(64, width, 3, 2, 1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, 2, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width, dim),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class BertText(nn.Module):
    def __init__(self, width: int, dim: int, vocab: int, dropout: float, init_range: float):
        super().__init__()
        text = {
            "initializer_range": init_range,
            "hidden": width,
            "heads": 4,
            "intermediate": 4 * width,
            "vocab_size": vocab,
            "dropout": dropout,
        }
        self.bert = TextEncoder(ModelConfig.from_dict({"preset": "small", "text": text}))
        self.proj = nn.Linear(width, dim)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.proj(self.bert(ids, mask, mode=Mode.TEXT)[:, 0])


class BowText(nn.Module):
    def __init__(self, width: int, dim: int, vocab: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.proj = nn.Sequential(nn.ReLU(), nn.Linear(width, dim))

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask[..., None].float()
        return self.proj((self.embed(ids) * m).sum(1) / m.sum(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--image", choices=["vit", "cnn"], default="vit")
    parser.add_argument("--text", choices=["bert", "bow"], default="bert")
    parser.add_argument("--image-size", type=int, default=48)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--text-lr", type=float, default=None, help="learning rate of the text side (default: --lr)"
    )
    parser.add_argument("--warmup", type=int, default=0, help="linear warm-up steps")
    parser.add_argument("--tau", type=float, default=0.07)
    parser.add_argument("--dropout", type=float, default=0.1, help="BERT dropout")
    parser.add_argument("--init-range", type=float, default=0.02, help="BERT initializer_range")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    tokenizer = ALBEFTokenizer.from_pretrained(f"{args.data}/tokenizer")
    transform = eval_transform(args.image_size)
    dataset = RetrievalTrainDataset(f"{args.data}/retrieval_train.json", image_source(args.data), transform)
    pixels = {}
    for record in dataset.records:
        if record["image"] not in pixels:
            pixels[record["image"]] = transform(dataset.images.open(record["image"]))
    dim, vocab = 64, 1000
    image = ViTImage(args.image_size, args.width, dim) if args.image == "vit" else CNNImage(args.width, dim)
    text = (
        BertText(args.width, dim, vocab, args.dropout, args.init_range)
        if args.text == "bert"
        else BowText(args.width, dim, vocab)
    )
    text_lr = args.text_lr if args.text_lr is not None else args.lr
    optimizer = torch.optim.AdamW(
        [
            {"params": image.parameters(), "lr": args.lr, "base": args.lr},
            {"params": text.parameters(), "lr": text_lr, "base": text_lr},
        ]
    )
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    print(
        f"{args.image}+{args.text}, lr {args.lr}, warm-up {args.warmup}, tau {args.tau}, chance acc {1 / args.batch_size:.3f}"
    )
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = group["base"] * min(1.0, (step + 1) / max(args.warmup, 1))
        index = torch.randint(0, len(dataset), (args.batch_size,), generator=gen).tolist()
        images = torch.stack([pixels[dataset.records[i]["image"]] for i in index])
        tokens = tokenizer([dataset.records[i]["caption"] for i in index], max_length=30)
        fi = F.normalize(image(images), dim=-1)
        ft = F.normalize(text(tokens.input_ids, tokens.attention_mask), dim=-1)
        logits = fi @ ft.t() / args.tau
        target = torch.arange(args.batch_size)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            acc = (logits.argmax(1) == target).float().mean().item()
            print(
                f"step {step:4d}  loss {loss.item():.3f}  in-batch acc {acc:.3f}  ({time.perf_counter() - start:.0f} s)"
            )


if __name__ == "__main__":
    main()
