"""Numerics of `model.kernels: auto` in training against the eager path, on DeepSeek-V2-Lite shapes (GPU).

Two layers of V2-Lite (the dense first one and one MoE layer), NF4 experts, LoRA r=16 on MLA and on all
routed experts in bf16 (as TRL trains them) with random B factors (so every LoRA factor gets a gradient), bf16, batch 2 x 2048, one
model run eager and then with `finetune.fast.fusion` applied. Reports, per output, the relative
Frobenius error ||fused - eager|| / ||eager|| for the MoE decoder layer's output, the loss and every LoRA gradient.

    PYTHONUNBUFFERED=1 python benchmarks/fusion_parity.py --out parity.json [--train-steps 20]

`--train-steps N` also trains the model N AdamW steps twice from the same start, eager and fused, on
four fixed batches in turn (learnable: the loss falls), and reports both loss curves and the largest
relative difference between them (issue 11's bar: 1 %).
"""

from __future__ import annotations

import argparse
import json

import torch
from moe_qlora import build  # benchmarks/ is on sys.path when this script runs

from finetune.fast import fusion


def forward_backward(model: torch.nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    captured = {}
    # The decoder layer, not its MoE module: with `fusion.apply` the layer runs its MoE inside a compiled
    # region, so a hook on the MoE module would never fire.
    layer = model.get_base_model().model.layers[1]

    def keep(module, args, out) -> None:  # returns None: the output goes on unchanged
        captured["layer_out"] = (out[0] if isinstance(out, tuple) else out).detach().float()

    hook = layer.register_forward_hook(keep)
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    hook.remove()
    grads = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach().float().reshape(1), **captured, **grads}


def start() -> torch.nn.Module:
    """The same model every call: seeded weights, LoRA B factors drawn so every factor has a gradient."""
    torch.manual_seed(0)
    model = build("nf4-experts+lora+bf16", 2, torch.bfloat16)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or (name.endswith("_B") and ".experts.lora_" in name):
                p.normal_(std=0.02)
    return model.train()


def train_losses(fused: bool, steps: int) -> list[float]:
    model = start()
    if fused:
        fusion.apply(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(1)
    batches = torch.randint(0, 100_000, (4, 2, 1024), device="cuda", generator=gen)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    del model, opt
    torch.cuda.empty_cache()
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="parity.json")
    parser.add_argument("--train-steps", type=int, default=0)
    args = parser.parse_args()
    model = start()
    ids = torch.randint(0, 100_000, (2, 2048), device="cuda")
    eager = forward_backward(model, ids)
    fusion.apply(model)
    fused = forward_backward(model, ids)
    assert eager.keys() == fused.keys()
    rel = {k: ((fused[k] - eager[k]).norm() / eager[k].norm().clamp_min(1e-30)).item() for k in eager}
    grads = [k for k in rel if k not in ("loss", "layer_out")]
    out = {
        "loss_eager": eager["loss"].item(),
        "loss_fused": fused["loss"].item(),
        "rel_loss": rel["loss"],
        "rel_layer_out": rel["layer_out"],
        "lora_grads": len(grads),
        "rel_grad_max": max(rel[k] for k in grads),
        "rel_grad_max_name": max(grads, key=rel.get),
        "rel_grad_median": sorted(rel[k] for k in grads)[len(grads) // 2],
    }
    del model
    torch.cuda.empty_cache()
    if args.train_steps:
        eager_losses = train_losses(False, args.train_steps)
        fused_losses = train_losses(True, args.train_steps)
        out["train_losses_eager"] = eager_losses
        out["train_losses_fused"] = fused_losses
        out["train_rel_loss_max"] = max(
            abs(f - e) / abs(e) for e, f in zip(eager_losses, fused_losses, strict=True)
        )
    print(json.dumps(out))
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
