from __future__ import annotations

import torch

from albef.config import tiny_config
from albef.models import ALBEFPretrain
from albef.train.optim import build_optimizer, param_groups


def test_official_weight_decay_groups():
    model = ALBEFPretrain(tiny_config())
    decay, no_decay = param_groups(model, 0.02)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    exempt = {names[id(p)] for p in no_decay["params"]}
    assert (
        "temp" in decayed and "visual_encoder.pos_embed" in decayed and "visual_encoder.cls_token" in decayed
    )
    assert "vision_proj.bias" in exempt and "visual_encoder.norm.weight" in exempt
    assert not any(n.split(".")[0].endswith("_m") for n in decayed | exempt)  # momentum twins are not trained
    assert decay["weight_decay"] == 0.02 and no_decay["weight_decay"] == 0.0


def test_fused_adamw_matches_the_reference_loop():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(3))]
    twins = [torch.nn.Parameter(p.detach().clone()) for p in params]
    fused = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.02, fused=True)
    loop = torch.optim.AdamW(twins, lr=1e-2, weight_decay=0.02, foreach=False)
    for step in range(5):
        for group in (params, twins):
            for i, p in enumerate(group):
                p.grad = torch.full_like(p, 0.1 * (step + 1) * (i + 1))
        fused.step()
        loop.step()
    for a, b in zip(params, twins, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_build_optimizer_uses_the_fused_kernel_on_cpu():
    opt = build_optimizer(ALBEFPretrain(tiny_config()), lr=1e-4)
    assert opt.defaults["fused"] is True
