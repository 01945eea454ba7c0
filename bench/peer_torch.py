"""The PyTorch peer's train step on the same GPU, for issue 4's comparison. Prints JSON like bench/throughput.py.

    python bench/peer_torch.py model=XL-2 batch=128                 # diffusers DiT, eager
    python bench/peer_torch.py model=XL-2 batch=128 compile=true    # torch.compile
    python bench/peer_torch.py model=tiny shape=8,8,4 classes=10 batch=8 steps=2 device=cpu   # smoke run on CPU

The peer is diffusers' `DiTTransformer2DModel` (AdaLN-Zero DiT, SDPA attention) with the flow-matching loss of
diffusers' reversed-time convention (x_t = (1 - t) x + t noise, target v = noise - x; training/flow.py runs t the
other way, the same loss), bf16 autocast, fused AdamW,
global-norm clipping and an EMA update (both on by default, as in our step; `clip=false ema=false` drops them).
FLOPs use the same analytic count as bench/throughput.py (models.forward_flops), so MFU compares like with like.
"""

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.throughput import PEAK_BF16_TFLOPS, read_yaml  # noqa: E402
from models import forward_flops, model_spec  # noqa: E402  (pure Python: no JAX backend starts)


def main(argv):
    import torch
    from diffusers import DiTTransformer2DModel

    args = dict(a.split("=", 1) for a in argv)
    model = read_yaml(ROOT / "configs/model" / f"{args.pop('model', 'XL-2')}.yaml")
    h, w, c = (int(s) for s in args.pop("shape", "32,32,4").split(","))
    classes, batch = int(args.pop("classes", 1000)), int(args.pop("batch", 128))
    steps, warmup = int(args.pop("steps", 20)), int(args.pop("warmup", 3))
    dev = args.pop("device", "cuda")
    compiled = args.pop("compile", "false") == "true"
    clip, ema = args.pop("clip", "true") == "true", args.pop("ema", "true") == "true"
    if args:
        raise SystemExit(f"error: unknown arguments {sorted(args)}")
    d, heads = model["hidden_size"], model["num_heads"]
    net = DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=d // heads, in_channels=c,
                                out_channels=c, num_layers=model["depth"], sample_size=h, patch_size=model["patch_size"],
                                num_embeds_ada_norm=classes).to(dev)
    fwd = torch.compile(net) if compiled else net   # the model is compiled, as the peers' scripts do
    ema_params = [p.detach().clone() for p in net.parameters()] if ema else None
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=0.0, fused=dev.startswith("cuda"))
    amp = torch.autocast(device_type=dev.split(":")[0], dtype=torch.bfloat16)

    def step(x, y):
        t = torch.rand(x.shape[0], device=dev)
        noise = torch.randn_like(x)
        tb = t[:, None, None, None]
        with amp:
            v = fwd(((1 - tb) * x + tb * noise), timestep=t * 1000, class_labels=y).sample
        loss = torch.mean((v.float() - (noise - x)) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0, foreach=True)
        opt.step()
        if ema:
            torch._foreach_lerp_(ema_params, [p.detach() for p in net.parameters()], 1 - 0.9999)
        return loss.detach()

    g = torch.Generator(device="cpu").manual_seed(0)
    xs = [torch.randn(batch, c, h, w, generator=g).to(dev) for _ in range(2)]
    ys = [torch.randint(0, classes, (batch,), generator=g).to(dev) for _ in range(2)]
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    t0 = time.perf_counter()
    loss = step(xs[0], ys[0])
    sync()
    first_s = time.perf_counter() - t0
    for i in range(warmup):
        loss = step(xs[i % 2], ys[i % 2])
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        loss = step(xs[i % 2], ys[i % 2])
    sync()
    dt = (time.perf_counter() - t0) / steps
    fl = forward_flops(model_spec(model, {"shape": [h, w, c], "num_classes": classes}))["forward_flops"]
    tf = 3 * fl * batch / dt / 1e12
    mem = torch.cuda.max_memory_allocated() / 1e9 if dev.startswith("cuda") else None
    print(json.dumps({"peer": "diffusers DiTTransformer2DModel", "model": model["name"], "compile": compiled,
                      "clip": clip, "ema": ema, "batch": batch, "shape": [h, w, c], "device":
                      torch.cuda.get_device_name() if dev.startswith("cuda") else dev, "torch": torch.__version__,
                      "params_M": sum(p.numel() for p in net.parameters()) / 1e6, "images_per_s": batch / dt,
                      "step_time_s": dt, "tflops_per_s": tf, "mfu_vs_989": tf / PEAK_BF16_TFLOPS,
                      "peak_device_memory_GB": mem, "first_step_s": first_s, "loss": float(loss)}))


if __name__ == "__main__":
    main(sys.argv[1:])
