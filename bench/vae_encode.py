"""VAE encoding throughput (images/s) of data/vae.py, on random images, for the development log.

    python bench/vae_encode.py vae=tiny resolution=32            # a tiny AutoencoderKL (random weights)
    python bench/vae_encode.py vae=autoencoders/fashion_mnist resolution=28
    python bench/vae_encode.py vae=sd3-random resolution=256 device=cuda dtype=bfloat16 n=512 batch=64

Arguments are key=value; defaults: n=256 batch=64 device=cpu dtype=float32 threads=0 (torch default).
Prints one JSON line. The first batch (warm-up) is not timed.
"""

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv):
    import numpy as np
    import torch

    args = dict(a.split("=", 1) for a in argv)
    n, batch, res = int(args.get("n", 256)), int(args.get("batch", 64)), int(args.get("resolution", 32))
    if int(args.get("threads", 0)):
        torch.set_num_threads(int(args["threads"]))
    from data.vae import load_vae

    name = args.get("vae", "tiny")
    if name == "tiny":   # the shared notes' tiny VAE: 658k parameters, 8x... 2x downsampling, 4 latent channels
        from diffusers import AutoencoderKL

        torch.manual_seed(0)
        m = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * 2,
                          up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                          norm_num_groups=32, sample_size=32)
        name = tempfile.mkdtemp(prefix="tiny-vae-")
        m.save_pretrained(name)
    vae = load_vae(name, args.get("device", "cpu"), args.get("dtype", "float32"))
    params = sum(p.numel() for p in vae.model.encoder.parameters()) + sum(
        p.numel() for p in (vae.model.quant_conv.parameters() if vae.model.quant_conv is not None else []))
    imgs = np.random.RandomState(0).randint(0, 256, (n, res, res, vae.in_channels), dtype=np.uint8)
    vae.encode(imgs[:batch], batch_size=batch)
    if vae.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    z = vae.encode(imgs, batch_size=batch)
    if vae.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(json.dumps({"vae": args.get("vae", "tiny"), "encoder_params": params, "resolution": res,
                      "latent": list(z.shape[1:]), "n": n, "batch": batch, "device": vae.device, "dtype": vae.dtype,
                      "threads": torch.get_num_threads(), "seconds": round(dt, 3), "images_per_s": round(n / dt, 1),
                      "process_cpu_seconds": round(cpu, 3)}))


if __name__ == "__main__":
    main(sys.argv[1:])
