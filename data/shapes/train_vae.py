"""Train the shapes world's VAE: a tiny diffusers `AutoencoderKL` (the class of SD3's VAE) on fresh renders.

    python data/shapes/train_vae.py                    # ~3 minutes of training with 1 thread (+~20 s of evaluation)
    python data/shapes/train_vae.py --data_dir=/tmp/shp1 --out_dir=/tmp/shp1 --threads=1

Writes into out_dir:
    vae/              config.json + diffusion_pytorch_model.safetensors (`AutoencoderKL.from_pretrained`);
                      scaling_factor / shift_factor are set so that z = (latent - shift) * scale has mean 0, std 1
    vae_report.json   parameters, training time, oracle exactness on val, latent statistics, codec speed

The bar: `shapes.detect_scene(decode(encode(x)))` must equal the true scene on >= 99% of val images, after
a few minutes of CPU training. What gets there (measured on the first, 64x64 version of the world: exactness
on fresh renders after 4 minutes with 1 thread; the ablations ran with batches of 32 crops of 32x32, which cost
the same per step and also reached the bar; on today's 48x48 world the defaults reach 100% in 174 s):
- L1 with 10x weight on edge pixels: the oracle reads shapes from their outlines (a small triangle becomes a
  circle once its apex or its one-pixel base corners blur away); plain L1 got 72% exact, mostly small triangles;
- f=4 with 8 latent channels (64x64x3 -> 16x16x8; 48x48x3 -> 12x12x8 today): 4 channels got 92-100% depending on the seed, f=8 with 16
  channels 78%;
- many small steps: batches of 8 images, ~1,300 steps (a first try with 300 steps of 32 images, 4 latent
  channels, attention and plain L1 got 0.2%);
- narrow at full resolution, where convs cost most, and no mid-block attention (+20% per step, slower to learn);
- infinite data: every batch is freshly rendered (~0.1 ms per image), so there is nothing to overfit; scenes
  have 1-9 objects (val has 1-4) so that more of every image is objects and edges;
- bf16 autocast (~1.5x on this CPU), a high peak lr with warmup, and a cosine decay.
"""
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # this script lives in data/shapes/; the world's code is at the top level
import shapes  # noqa: E402
from configurator import at_least, between, configure, must  # noqa: E402
from data import load_images, read_jsonl, write_json  # noqa: E402
from common import atomic_dir, RULES  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))

config = dict(
    data_dir=HERE,  # dataset folder from prepare.py (val.jsonl for the exactness check, train.jsonl for latent stats)
    out_dir=HERE,  # where vae/ and vae_report.json go
    seed=0,  # torch init / sampling and the scene stream
    block_out_channels=(16, 32, 64),  # 3 levels = downsampling factor 4; narrow at full resolution, where convs cost most
    layers_per_block=1,  # resnets per encoder level (the decoder gets one more)
    latent_channels=8,  # 48x48x3 -> 12x12x8 latent
    norm_num_groups=8,  # must divide every entry of block_out_channels
    mid_block_add_attention=False,  # SD's VAE has it; here it costs ~20% of a step and learned slower per second
    max_steps=1300,  # optimizer steps; the lr schedule runs over them (~134 ms each with 1 thread here: ~3 min)
    batch_size=8,  # fresh renders per step: small batches give more steps in the budget
    max_objects=9,  # training scenes have 1..max_objects objects (val has 1-4): more edges per image
    lr=3e-3,  # AdamW peak learning rate
    warmup=50,  # linear warmup steps
    min_lr_frac=0.05,  # the cosine ends at this fraction of lr
    beta2=0.99,  # AdamW beta2
    grad_clip=1.0,  # global gradient-norm clip
    edge_weight=10.0,  # extra L1 weight on pixels whose 3x3 neighbourhood is not one colour
    kl_weight=1e-6,  # KL / reconstruction ratio, both per element (SD's VAE uses 1e-6 too)
    bf16=True,  # bf16 autocast for training
    eval_n=1000,  # val images for the exactness check
    stats_n=2000,  # train images for the latent mean / std
    log_interval=100,  # steps between log lines
    threads=0,  # torch threads (0 = torch's default)
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work (data_dir: read after training)
    block_out_channels=must(lambda v, c: len(v) >= 1 and all(isinstance(n, int) and n > 0 and n % c.norm_num_groups == 0 for n in v),
                            "a tuple of positive channel counts, each divisible by norm_num_groups"),
    layers_per_block=at_least(1),
    latent_channels=at_least(1),
    norm_num_groups=at_least(1),
    max_objects=between(1, 9, "distinct cells of the 3x3 grid"),
    min_lr_frac=between(0.0, 1.0),
    beta2=must(lambda v, c: 0 <= v < 1, "in [0, 1)"),
    edge_weight=at_least(0.0),
    kl_weight=at_least(0.0),
    stats_n=at_least(1),
)


def build_vae(cfg) -> AutoencoderKL:
    levels = len(cfg.block_out_channels)
    return AutoencoderKL(block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
                         down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
                         latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
                         mid_block_add_attention=cfg.mid_block_add_attention, sample_size=shapes.CANVAS)


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> float in [-1, 1], the range diffusers VAEs expect."""
    return images.float() / 127.5 - 1


def fresh_batch(rng: random.Random, cfg) -> torch.Tensor:
    images = np.stack([shapes.render(shapes.sample_scene(rng, 1, cfg.max_objects)) for _ in range(cfg.batch_size)])
    return to_model_range(torch.from_numpy(images).permute(0, 3, 1, 2))


def edge_weights(x: torch.Tensor, weight: float) -> torch.Tensor:
    """1 + weight on both sides of every outline; renders are exactly flat, so any local spread is an edge."""
    spread = F.max_pool2d(x, 3, 1, 1) + F.max_pool2d(-x, 3, 1, 1)  # per-channel max - min over 3x3
    return 1 + weight * (spread.amax(1, keepdim=True) > 0).float()


def train(vae: AutoencoderKL, cfg) -> dict:
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, betas=(0.9, cfg.beta2), weight_decay=0.0)
    vae.train()
    t0, step, losses = time.time(), 0, []
    while step < cfg.max_steps:
        progress = step / cfg.max_steps
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * (
            cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * progress)))
        for g in opt.param_groups:
            g["lr"] = lr
        x = fresh_batch(rng, cfg)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            posterior = vae.encode(x).latent_dist
            y = vae.decode(posterior.sample()).sample
        rec = (edge_weights(x, cfg.edge_weight) * (y.float() - x).abs()).mean()
        kl = posterior.kl().float().mean() / x[0].numel()
        loss = rec + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(rec.item())
        if step % cfg.log_interval == 0:
            print(f"step {step} rec {np.mean(losses[-cfg.log_interval:]):.4f} kl {kl.item():.3f} lr {lr:.2e} "
                  f"t {time.time() - t0:.0f}s", flush=True)
        step += 1
    seconds = time.time() - t0
    vae.eval()
    return {"steps": step, "train_seconds": round(seconds, 1), "ms_per_step": round(1000 * seconds / step, 1),
            "final_rec_loss": float(np.mean(losses[-50:]))}


@torch.no_grad()
def encode_mode(vae: AutoencoderKL, x: torch.Tensor, batch: int = 100) -> torch.Tensor:
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mode() for i in range(0, len(x), batch)])


@torch.no_grad()
def decode_images(vae: AutoencoderKL, latents: torch.Tensor, batch: int = 100) -> torch.Tensor:
    """Latents -> (N, 3, H, W) float images in [0, 1], the form detect_scene accepts."""
    return torch.cat([vae.decode(latents[i:i + batch]).sample.clamp(-1, 1) for i in range(0, len(latents), batch)]) / 2 + 0.5


@torch.no_grad()
def evaluate(vae: AutoencoderKL, cfg) -> dict:
    """Oracle exactness of val reconstructions from the posterior mode and from a posterior sample, codec speed."""
    records = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    scenes = [shapes.scene_from_json(r["scene"]) for r in records]
    x = to_model_range(load_images(records))
    t0 = time.time()
    mode = encode_mode(vae, x)
    t1 = time.time()
    recon = decode_images(vae, mode)
    t2 = time.time()
    generator = torch.Generator().manual_seed(cfg.seed)
    sampled = torch.cat([vae.encode(x[i:i + 100]).latent_dist.sample(generator) for i in range(0, len(x), 100)])
    recon_sampled = decode_images(vae, sampled)
    detected = [shapes.detect_scene(img) for img in recon]
    missed = {}  # true objects the oracle did not read back, by kind: where the VAE is weakest
    for found, truth in zip(detected, scenes):
        for obj in set(truth) - set(found):
            missed[f"{obj.size} {obj.shape}"] = missed.get(f"{obj.size} {obj.shape}", 0) + 1
    return {
        "val_images": len(records),
        "exact_mode": float(np.mean([d == s for d, s in zip(detected, scenes)])),
        "exact_sample": float(np.mean([shapes.detect_scene(img) == s for img, s in zip(recon_sampled, scenes)])),
        "missed_objects": missed,
        "l1_mode_255": round(255 * (recon - (x + 1) / 2).abs().mean().item(), 3),
        "posterior_std_mean": round(vae.encode(x[:100]).latent_dist.std.mean().item(), 5),
        "encode_ms_per_image": round(1000 * (t1 - t0) / len(x), 2),  # fp32, batches of 100
        "decode_ms_per_image": round(1000 * (t2 - t1) / len(x), 2),
    }


@torch.no_grad()
def latent_stats(vae: AutoencoderKL, cfg) -> dict:
    """Mean / std of posterior-mode latents of train images: the SD3-style shift and scale for the diffusion model."""
    records = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"))[:cfg.stats_n]
    latents = encode_mode(vae, to_model_range(load_images(records)))
    return {"latent_shape": list(latents.shape[1:]), "latent_mean": latents.mean().item(), "latent_std": latents.std().item(),
            "channel_mean": [round(v, 4) for v in latents.mean((0, 2, 3)).tolist()],
            "channel_std": [round(v, 4) for v in latents.std((0, 2, 3)).tolist()]}


def main(argv=None):
    cfg = configure(config, argv, rules)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    vae = build_vae(cfg)
    report = {"parameters": sum(p.numel() for p in vae.parameters()), "threads": torch.get_num_threads()}
    report.update(train(vae, cfg))
    stats = latent_stats(vae, cfg)
    vae.register_to_config(scaling_factor=1 / stats["latent_std"], shift_factor=stats["latent_mean"])
    report.update(stats, scaling_factor=vae.config.scaling_factor, shift_factor=vae.config.shift_factor)
    report.update(evaluate(vae, cfg))
    report["config"] = vars(cfg)
    os.makedirs(cfg.out_dir, exist_ok=True)
    with atomic_dir(os.path.join(cfg.out_dir, "vae")) as tmp:  # the speedrun takes vae/config.json as "done"
        vae.save_pretrained(tmp)
    write_json(os.path.join(cfg.out_dir, "vae_report.json"), report)
    print("shapes vae: " + " ".join(f"{k} {report[k]}" for k in (
        "parameters", "steps", "train_seconds", "ms_per_step", "exact_mode", "exact_sample", "latent_shape",
        "latent_mean", "latent_std", "encode_ms_per_image", "decode_ms_per_image")))


if __name__ == "__main__":
    main(sys.argv[1:])
