"""Retrieval evaluation: albef's :func:`albef.eval.retrieval.evaluate_retrieval` against the official
algorithm, on the same model and the same images and captions; wall time, ITM pairs/s, rankings compared.

Official algorithm (``Retrieval.py`` ``evaluation``), reproduced by :func:`score_matrices_per_query`: texts
tokenized with ``padding="max_length"`` (30 tokens in the official ``Retrieval.py``, ``--max-tokens`` here), image and
text features in batches, then for every image its top-k texts and for every text its top-k images, each
query's k pairs fused in one forward with the image tokens repeated k times.

albef: the same features (texts padded to the longest caption only), then the union of both candidate lists
scored once per pair, grouped by image so each image's cross-attention keys/values are projected once, in
batches of similar-length texts cut to their longest caption.

Both sides start from decoded, resized image tensors held in host memory (JPEG decoding is excluded from
both) and run on the same device (``--device``, albef's device rule: ``auto`` is the GPU when there is one)
in the same precision (``--dtype bf16``: autocast on the GPU for both sides). Each side's clock starts and
stops with the device synchronised; both sides first run once, untimed, on a few images (CUDA start-up,
kernel selection, first-call allocations). Wall times exclude the recall metrics, which both compute alike on the host.

    python benchmarks/retrieval_eval.py                                   # small preset, synthetic test split
    python benchmarks/retrieval_eval.py --preset base --images 100 --k-test 128 --image-size 384
    python benchmarks/retrieval_eval.py --random-text                     # no data needed: random captions
    python benchmarks/retrieval_eval.py --model models/retrieval          # the finetuned model of dvc repro
    python benchmarks/retrieval_eval.py --smoke --json out.json           # tiny, seconds on CPU
    python benchmarks/retrieval_eval.py --device cuda --preset base --random-text --images 1000 --captions 5 \
        --k-test 128 --image-size 384 --json retrieval-gpu.json           # COCO-like 5k test split on a GPU

With random weights the image->text and text->image candidate lists barely overlap; with a trained model (the
case evaluation exists for) they share many pairs, which albef scores once and the official loop twice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's albef, installed or not

from albef.config import PRESETS, ConfigError, ModelConfig, read_params
from albef.device import autocast, resolve_device, resolve_precision
from albef.eval.retrieval import (
    candidate_pairs,
    evaluate_retrieval,
    recall_metrics,
    score_matrices_per_query,
)
from albef.models import ALBEFRetrieval
from albef.models.retrieval import text_features
from albef.tokenizer import TokenBatch

# --smoke: sizes that run in a few seconds on a CPU
SMOKE = {"preset": "tiny", "random_text": True, "images": 12, "captions": 5, "k_test": 8}


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


def subset(dataset: InMemoryEval, n: int) -> InMemoryEval:
    """The first ``n`` images and their captions."""
    n = min(n, len(dataset))
    counts = [len(dataset.img2txt[i]) for i in range(n)]
    return InMemoryEval(dataset.image_tensors[:n], dataset.texts[: sum(counts)], counts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def official(model, dataset: InMemoryEval, tokenizer, args, device: torch.device, amp_dtype):
    """The official evaluation: features in batches, then the per-query ITM loop on max_length padding.
    Returns (image->text scores, text->image scores, features seconds, total seconds)."""
    synchronize(device)
    start = time.perf_counter()
    tokens = tokenizer(dataset.texts, max_length=args.max_tokens, padding="max_length")
    mask = tokens.attention_mask.to(device)
    with autocast(device, amp_dtype):
        embeds, feats = [], []
        for lo in range(0, len(dataset), 64):  # the official data loader's batches, moved one by one
            e, f = model.encode_image(dataset.image_tensors[lo : lo + 64].to(device))
            embeds.append(e)
            feats.append(f.float())
        img_embeds, img_feats = torch.cat(embeds), torch.cat(feats)
        txt_embeds, txt_feats = text_features(model, tokens.input_ids.to(device), mask, batch_size=256)
    synchronize(device)
    features = time.perf_counter() - start
    with autocast(device, amp_dtype):
        _, i2t, t2i = score_matrices_per_query(
            model, img_embeds, img_feats, txt_embeds, txt_feats.float(), mask, args.k_test
        )
    synchronize(device)
    return i2t.cpu(), t2i.cpu(), features, time.perf_counter() - start


def ours(model, dataset: InMemoryEval, tokenizer, args, device: torch.device, amp_dtype):
    """albef's evaluation; returns its result and the wall time of the whole call (metrics included)."""
    synchronize(device)
    start = time.perf_counter()
    result = evaluate_retrieval(
        model,
        dataset,
        tokenizer,
        k_test=args.k_test,
        max_tokens=args.max_tokens,
        device=device,
        pair_batch=args.pair_batch,
        amp_dtype=amp_dtype,
    )
    synchronize(device)
    return result, time.perf_counter() - start


def consistent(ours: torch.Tensor, theirs: torch.Tensor, k: int, tol: float = 1e-5) -> bool:
    """Rankings agree when, walking albef's top-k order, the official scores never increase by more than float
    noise: pairs whose scores tie to ~1e-7 may swap places, nothing else may."""
    order = ours.argsort(dim=1, descending=True, stable=True)[:, :k]
    along = theirs.gather(1, order)
    return bool((along[:, 1:] <= along[:, :-1] + tol).all())


def top1_agreement(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    """The fraction of queries whose best candidate is the same on both sides (informative under bf16)."""
    return float((ours.argmax(dim=1) == theirs.argmax(dim=1)).float().mean())


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
    parser.add_argument(
        "--device",
        default="auto",
        help="auto (the GPU when there is one), cpu, cuda or cuda:N (albef.device)",
    )
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast on the GPU, both sides"
    )
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help=f"tiny random sizes, a few seconds on CPU (sets {', '.join(f'{k}={v}' for k, v in SMOKE.items())})",
    )
    args = parser.parse_args()
    if args.smoke:
        vars(args).update(SMOKE)
    try:
        device = resolve_device(args.device, "--device")
        amp_dtype = resolve_precision(args.dtype, device, "--dtype")
    except ConfigError as exc:
        parser.error(str(exc))
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
    model.to(device)
    dataset, tokenizer, source = build_inputs(args, cfg)

    # untimed: first-call costs (CUDA context, cuBLAS handles, kernel selection) fall on neither side
    warm = subset(dataset, 4)
    official(model, warm, tokenizer, args, device, amp_dtype)
    ours(model, warm, tokenizer, args, device, amp_dtype)

    slow_i2t, slow_t2i, slow_features, t_slow = official(model, dataset, tokenizer, args, device, amp_dtype)
    result, t_call = ours(model, dataset, tokenizer, args, device, amp_dtype)
    t_fast = result.seconds["total"]

    k = args.k_test
    same = consistent(result.score_i2t, slow_i2t, k) and consistent(result.score_t2i, slow_t2i, k)
    max_diff = max(
        (result.score_i2t - slow_i2t).abs().max().item(), (result.score_t2i - slow_t2i).abs().max().item()
    )
    same_metrics = result.metrics == recall_metrics(
        slow_i2t.numpy(), slow_t2i.numpy(), dataset.img2txt, dataset.txt2img
    )
    n_img, n_txt = len(dataset), len(dataset.texts)
    pairs_official = n_img * min(k, n_txt) + n_txt * min(k, n_img)
    pairs_ours = len(candidate_pairs(result.sims, k)[2])
    itm_slow, itm_fast = t_slow - slow_features, result.seconds["itm"]
    v = cfg.vision
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(
        f"model: vision {v.image_size}px/{v.patch_size} width {v.width} depth {v.depth}, text hidden "
        f"{cfg.text.hidden} {cfg.text.text_layers}+{cfg.text.fusion_layers} layers ({args.model or 'random weights'})"
    )
    print(f"data: {source}; k_test {k}; {device} ({where}), {args.dtype}; torch {torch.__version__}")
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
    if args.json:
        side = {"official": (pairs_official, slow_features, itm_slow, t_slow)}
        side["albef"] = (pairs_ours, result.seconds["features"], itm_fast, t_fast)
        figures = {
            "device": str(device),
            "device_name": where,
            "dtype": args.dtype,
            "torch": torch.__version__,
            "model": {
                "preset": args.preset,
                "weights": args.model or "random",
                "image_size": v.image_size,
                "vision_width": v.width,
                "vision_depth": v.depth,
                "text_hidden": cfg.text.hidden,
                "text_layers": cfg.text.text_layers,
                "fusion_layers": cfg.text.fusion_layers,
            },
            "data": source,
            "images": n_img,
            "texts": n_txt,
            "k_test": k,
            "pair_batch": args.pair_batch,
            **{
                name: {
                    "itm_pairs": pairs,
                    "features_s": round(feat, 4),
                    "itm_s": round(itm, 4),
                    "total_s": round(total, 4),
                    "pairs_per_s": round(pairs / itm, 1),
                }
                for name, (pairs, feat, itm, total) in side.items()
            },
            "albef_call_s": round(t_call, 4),  # the whole call: metrics and copies to the host included
            "speedup_total": round(t_slow / t_fast, 3),
            "speedup_itm": round(itm_slow / itm_fast, 3),
            "identical_rankings": same,
            "identical_metrics": same_metrics,
            "max_score_diff": max_diff,
            "top1_agreement": {
                "i2t": top1_agreement(result.score_i2t, slow_i2t),
                "t2i": top1_agreement(result.score_t2i, slow_t2i),
            },
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"figures written to {path}")


if __name__ == "__main__":
    main()
