"""Retrieval evaluation speed: albef's batched, de-duplicated ITM re-ranking against the official per-query
algorithm, on the same model and features (random weights; scoring cost does not depend on them).

    python benchmarks/retrieval_eval.py --preset small --images 200 --k-test 16

Prints wall time and ITM pairs/s of each, the speed-up, and whether the rankings agree.
"""

from __future__ import annotations

import argparse
import time

import torch

from albef.config import PRESETS
from albef.eval.retrieval import candidate_pairs, score_matrices, score_matrices_per_query
from albef.models import ALBEFRetrieval
from albef.models.retrieval import image_features, text_features


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="small", choices=sorted(PRESETS))
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--k-test", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256, help="pairs per fusion batch (albef)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = PRESETS[args.preset]()
    model = ALBEFRetrieval(cfg).eval()
    n_txt = args.images * args.captions
    images = torch.randn(args.images, 3, cfg.vision.image_size, cfg.vision.image_size)
    ids = torch.randint(5, cfg.text.vocab_size, (n_txt, 20))
    ids[:, 0] = cfg.text.cls_token_id
    mask = torch.ones_like(ids)
    img_embeds, img_feats = image_features(model, images)
    txt_embeds, txt_feats = text_features(model, ids, mask)
    inputs = (model, img_embeds, img_feats, txt_embeds, txt_feats, mask, args.k_test)

    start = time.perf_counter()
    _, fast_i2t, fast_t2i = score_matrices(*inputs, batch_size=args.batch_size)
    t_fast = time.perf_counter() - start
    start = time.perf_counter()
    _, slow_i2t, slow_t2i = score_matrices_per_query(*inputs)
    t_slow = time.perf_counter() - start

    pairs_official = (args.images + n_txt) * args.k_test
    pairs_ours = len(candidate_pairs(img_feats @ txt_feats.t(), args.k_test)[2])
    k = args.k_test
    same = all(
        torch.equal(
            a.argsort(dim=1, descending=True, stable=True)[:, :k],
            b.argsort(dim=1, descending=True, stable=True)[:, :k],
        )
        for a, b in ((fast_i2t, slow_i2t), (fast_t2i, slow_t2i))
    )
    max_diff = max((fast_i2t - slow_i2t).abs().max().item(), (fast_t2i - slow_t2i).abs().max().item())
    print(
        f"preset {args.preset}, {args.images} images x {args.captions} captions, k_test {k}, {args.threads} threads"
    )
    print(f"{'algorithm':<36} {'ITM pairs':>10} {'seconds':>8} {'pairs/s':>8}")
    print(
        f"{'official per-query loop':<36} {pairs_official:>10} {t_slow:8.2f} {pairs_official / t_slow:8.0f}"
    )
    print(f"{'albef batched, each pair once':<36} {pairs_ours:>10} {t_fast:8.2f} {pairs_ours / t_fast:8.0f}")
    print(
        f"speed-up {t_slow / t_fast:.2f}x; identical top-{k} rankings: {same}; max |score diff| {max_diff:.2e}"
    )


if __name__ == "__main__":
    main()
