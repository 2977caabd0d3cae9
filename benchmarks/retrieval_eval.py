"""Retrieval evaluation: albef's :func:`albef.eval.retrieval.evaluate_retrieval` against the official
algorithm, on the same model and the same images and captions; wall time, ITM pairs/s, rankings compared.

Official algorithm (``Retrieval.py`` ``evaluation``), reproduced by :func:`score_matrices_per_query`: texts
tokenized with ``padding="max_length"`` (30 tokens in the official ``Retrieval.py``, ``--max-tokens`` here), image and
text features in batches, then for every image its top-k texts and for every text its top-k images, each
query's k pairs fused in one forward with the image tokens repeated k times.

albef: the same features (texts padded to the longest caption only), then the union of both candidate lists
scored once per pair, grouped by image so each image's cross-attention keys/values are projected once, in
batches of similar-length texts cut to their longest caption.

Both sides start from decoded, resized image tensors held in memory (JPEG decoding is excluded from both).

    python benchmarks/retrieval_eval.py                                   # small preset, synthetic test split
    python benchmarks/retrieval_eval.py --preset base --images 100 --k-test 128 --image-size 384
    python benchmarks/retrieval_eval.py --random-text                     # no data needed: random captions
    python benchmarks/retrieval_eval.py --model models/retrieval          # the finetuned model of dvc repro

With random weights the image->text and text->image candidate lists barely overlap; with a trained model (the
case evaluation exists for) they share many pairs, which albef scores once and the official loop twice.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from albef.config import PRESETS, ModelConfig, read_params
from albef.eval.retrieval import (
    candidate_pairs,
    evaluate_retrieval,
    recall_metrics,
    score_matrices_per_query,
)
from albef.models import ALBEFRetrieval
from albef.models.retrieval import image_features, text_features
from albef.tokenizer import TokenBatch


class InMemoryEval(Dataset):
    """What ``evaluate_retrieval`` reads from a retrieval split, with images already as tensors."""

    def __init__(self, images: torch.Tensor, texts: list[str], captions_per_image: list[int]):
        self.image_tensors, self.texts = images, texts
        self.img2txt, self.txt2img, t = {}, {}, 0
        for i, n in enumerate(captions_per_image):
            self.img2txt[i] = list(range(t, t + n))
            for j in range(t, t + n):
                self.txt2img[j] = i
            t += n

    def __len__(self) -> int:
        return self.image_tensors.shape[0]

    def __getitem__(self, index: int):
        return self.image_tensors[index], index


class PretokenizedTexts:
    """A stand-in tokenizer for random captions: returns fixed token ids, padded to the longest."""

    def __init__(self, ids: list[list[int]], pad: int):
        self.ids, self.pad = ids, pad
        self.index = {str(i): i for i in range(len(ids))}

    def __call__(self, texts, max_length: int, padding: str = "longest") -> TokenBatch:
        rows = [self.ids[self.index[t]][:max_length] for t in texts]
        width = max_length if padding == "max_length" else max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for n, r in enumerate(rows):
            input_ids[n, : len(r)] = torch.tensor(r)
            mask[n, : len(r)] = 1
        return TokenBatch(input_ids, mask)


def build_inputs(args, cfg: ModelConfig):
    gen = torch.Generator().manual_seed(0)
    data = Path(args.data)
    if not args.random_text and (data / args.split).is_file():
        from albef.data.datasets import RetrievalEvalDataset, image_source
        from albef.data.transforms import eval_transform
        from albef.tokenizer import ALBEFTokenizer

        split = RetrievalEvalDataset(
            data / args.split, image_source(data), eval_transform(cfg.vision.image_size)
        )
        n = min(args.images, len(split))
        images = torch.stack([split[i][0] for i in range(n)])
        counts = [len(split.img2txt[i]) for i in range(n)]
        texts = [split.texts[t] for i in range(n) for t in split.img2txt[i]]
        tokenizer = ALBEFTokenizer.from_pretrained(data / "tokenizer")
        tokenizer.check_compatible(cfg.text)
        source = f"{data / args.split} ({n} images, {len(texts)} captions)"
    else:
        n = args.images
        images = torch.randn(n, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen)
        counts = [args.captions] * n
        # caption lengths like COCO's: 8-20 word pieces mostly, up to max_tokens
        lengths = torch.clamp(
            torch.normal(13.0, 4.0, (n * args.captions,), generator=gen), 6, args.max_tokens
        )
        ids = []
        for length in lengths.long().tolist():
            row = torch.randint(5, cfg.text.vocab_size, (length,), generator=gen).tolist()
            ids.append([cfg.text.cls_token_id, *row[1:]])
        texts = [str(i) for i in range(len(ids))]
        tokenizer = PretokenizedTexts(ids, cfg.text.pad_token_id)
        source = f"random captions ({n} images, {len(texts)} captions, 6-{args.max_tokens} tokens)"
    return InMemoryEval(images, texts, counts), tokenizer, source


def official(model, dataset: InMemoryEval, tokenizer, args):
    """The official evaluation: features in batches, then the per-query ITM loop on max_length padding."""
    start = time.perf_counter()
    tokens = tokenizer(dataset.texts, max_length=args.max_tokens, padding="max_length")
    img_embeds, img_feats = image_features(model, dataset.image_tensors, batch_size=64)
    txt_embeds, txt_feats = text_features(model, tokens.input_ids, tokens.attention_mask, batch_size=256)
    features = time.perf_counter() - start
    _, i2t, t2i = score_matrices_per_query(
        model, img_embeds, img_feats, txt_embeds, txt_feats, tokens.attention_mask, args.k_test
    )
    return i2t, t2i, features, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default=None, choices=sorted(PRESETS), help="default: params.yaml model")
    parser.add_argument(
        "--params", default="params.yaml", help="model section used when --preset is not given"
    )
    parser.add_argument("--model", default=None, help="an albef model folder (default: random weights)")
    parser.add_argument("--image-size", type=int, default=None)
    parser.add_argument("--data", default="data/processed")
    parser.add_argument("--split", default="retrieval_test.json")
    parser.add_argument("--random-text", action="store_true", help="random captions instead of a split")
    parser.add_argument("--images", type=int, default=500)
    parser.add_argument("--captions", type=int, default=5, help="captions per image (random text)")
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=30, help="official max_length (30 in Retrieval.py)")
    parser.add_argument("--pair-batch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        from albef.checkpoint import load_for_task

        model = load_for_task(args.model, "retrieval")[0].eval()
        cfg = model.cfg
    else:
        preset = PRESETS[args.preset]() if args.preset else None
        cfg = preset or ModelConfig.from_dict(read_params(args.params)["model"])
        if args.image_size:
            cfg.vision.image_size = args.image_size
        model = ALBEFRetrieval(cfg).eval()
    dataset, tokenizer, source = build_inputs(args, cfg)

    slow_i2t, slow_t2i, slow_features, t_slow = official(model, dataset, tokenizer, args)
    result = evaluate_retrieval(
        model, dataset, tokenizer, k_test=args.k_test, max_tokens=args.max_tokens, pair_batch=args.pair_batch
    )
    t_fast = result.seconds["total"]

    k = args.k_test

    # Rankings agree when, walking albef's order, the official scores never increase by more than float
    # noise: pairs whose scores tie to ~1e-7 may swap places, nothing else may.
    def consistent(ours: torch.Tensor, theirs: torch.Tensor, tol: float = 1e-5) -> bool:
        order = ours.argsort(dim=1, descending=True, stable=True)[:, :k]
        along = theirs.gather(1, order)
        return bool((along[:, 1:] <= along[:, :-1] + tol).all())

    same = consistent(result.score_i2t, slow_i2t) and consistent(result.score_t2i, slow_t2i)
    max_diff = max(
        (result.score_i2t - slow_i2t).abs().max().item(), (result.score_t2i - slow_t2i).abs().max().item()
    )
    same_metrics = result.metrics == recall_metrics(
        slow_i2t.numpy(), slow_t2i.numpy(), dataset.img2txt, dataset.txt2img
    )
    n_img, n_txt = len(dataset), len(dataset.texts)
    pairs_official = (n_img + n_txt) * k
    pairs_ours = len(candidate_pairs(result.sims, k)[2])
    itm_slow, itm_fast = t_slow - slow_features, result.seconds["itm"]
    v = cfg.vision
    print(
        f"model: vision {v.image_size}px/{v.patch_size} width {v.width} depth {v.depth}, text hidden "
        f"{cfg.text.hidden} {cfg.text.text_layers}+{cfg.text.fusion_layers} layers ({args.model or 'random weights'})"
    )
    print(f"data: {source}; k_test {k}; {args.threads} threads; {torch.__version__}")
    print(f"{'':<34} {'ITM pairs':>10} {'features s':>10} {'ITM s':>8} {'total s':>8} {'pairs/s':>8}")
    print(
        f"{'official per-query loop':<34} {pairs_official:>10} {slow_features:10.2f} {itm_slow:8.2f} "
        f"{t_slow:8.2f} {pairs_official / itm_slow:8.0f}"
    )
    print(
        f"{'albef evaluate_retrieval':<34} {pairs_ours:>10} {result.seconds['features']:10.2f} {itm_fast:8.2f} "
        f"{t_fast:8.2f} {pairs_ours / itm_fast:8.0f}"
    )
    print(
        f"speed-up: whole evaluation {t_slow / t_fast:.2f}x, ITM re-ranking {itm_slow / itm_fast:.2f}x; "
        f"identical top-{k} rankings (up to float ties): {same}; identical recall metrics: {same_metrics}; "
        f"max |score diff| {max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
