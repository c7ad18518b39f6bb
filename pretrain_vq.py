"""UMM-2 stage 0 (shapes scale): the VQ image tokenizer Janus draws with, trained on the world's images.

Janus-Pro generates images as the codes of a VQ tokenizer (LlamaGen's VQGAN: transformers' JanusVQVAE) and
keeps it frozen in every later stage, so this stage decides what the UMM-2 can draw at all: the oracle must
read its reconstructions exactly (issue 25: >= 99% of 1,000 val scenes). The shapes world's default is one
token per 8-px square (48 px, 4 levels: a 6x6 grid, 36 tokens), 1024 codes of dim 8 on the unit sphere.
One token per 16-px grid cell (5 levels, 9 tokens) was measured first and learns far slower (plain MSE, 400
steps: every cell's code set by its position, reconstructions grey blobs; object-weighted, 600 steps: 0.3%
exact; the 6x6 grid: 10.6% at 600 steps, at a lower cost per step). A likely reason: the Janus VQ's
GroupNorms normalise each channel over the token grid, so on a 3x3 grid a cell's features depend on the 8 others.

    python pretrain_vq.py --data_dir=data/shapes
    torchrun --standalone --nproc_per_node=2 pretrain_vq.py

Loss (VQ-VAE, van den Oord et al. 2017, eq. 3, with LlamaGen's l2-normalised codes; umm2.vq_autoencode):
pixel MSE of the straight-through reconstruction + codebook term |sg(z) - e|^2 + beta |z - sg(e)|^2. Codes
no image used since the last restart_interval steps restart at encoder outputs of the current batch
(a dead code otherwise stays dead: nothing pulls it). No perceptual or adversarial loss: the world's images
are flat colours on a flat background, and the probe is the oracle, not a judge of texture.
Writes out_dir/vq (the JanusVQVAE in the transformers layout; pretrain_umm2.py builds the UMM-2 around it)
with training state beside it.
"""
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import shapes
import umm2
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, end_run, lr_at, NonFiniteGuard, RULES,
    RESUME_REMEDY, save_checkpoint, set_rng_state, start_run)
from configurator import above, at_least, configure, must
from data import load_images, read_jsonl

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    out_dir="out/pretrain_vq",  # checkpoint directory; the tokenizer goes to out_dir/vq
    resume=True,  # continue from out_dir if it holds an unfinished run
    # tokenizer size
    levels=4,  # resolutions, one 2x downsampling between each: 48 px / 2^3 = a 6x6 token grid (5: 3x3, one per grid cell; slower, see above)
    channels=32,  # width at every level (a multiple of 32: GroupNorm)
    res_blocks=0,  # ResNet blocks per encoder level (the decoder has one more; the middle blocks work on the 3x3 grid)
    codebook_size=1024,  # codes (a token holds a quarter of one of 36 kinds of object, at 9 jitters, or nothing)
    code_dim=8,  # code vector size (l2-normalised)
    # optimisation
    max_steps=3000,  # optimizer steps
    batch_size=32,  # global batch (split over ranks)
    lr=1e-3,  # AdamW peak learning rate
    warmup=100,  # linear warmup steps
    weight_decay=0.0,  # AdamW weight decay
    grad_clip=1.0,  # max gradient norm
    beta=0.25,  # commitment weight (VQ-VAE)
    object_weight=3.0,  # pixel-loss weight of object pixels (unlike the background) against background ones (10: objects drawn too big)
    restart_interval=100,  # steps between dead-code restarts (0 = never)
    # evaluation / logging
    eval_interval=200,  # steps between oracle probes
    eval_n=1000,  # val images per probe
    log_interval=50,  # steps between log lines
    save_interval=200,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="float32",  # compute precision (bfloat16 autocast is possible; the tokenizer is small and fp32 is exact)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    levels=at_least(1),  # that 2 ** (levels - 1) divides the image side: umm2.build_vq
    channels=must(lambda v, c: v > 0 and v % 32 == 0, "a positive multiple of 32 (GroupNorm of 32 groups)"),
    res_blocks=at_least(0),
    codebook_size=at_least(1),
    code_dim=at_least(1),
    beta=at_least(0.0, "the commitment weight"),
    object_weight=above(0.0, "object pixels' weight against the background's 1"),
    restart_interval=at_least(0, "0 = never"),
)


class Tokenizer:
    """save_checkpoint's view of the stage's one part: the tokenizer in out_dir/vq (transformers layout)."""

    def __init__(self, vq):
        self.vq = vq

    def save(self, directory: str, trained=("vq",)):
        self.vq.save_pretrained(os.path.join(directory, "vq"))


@torch.no_grad()
def probe(vq, images, scenes, batch=250) -> dict:
    """The acceptance test: does the oracle read decode(encode(x)) as x's scene? GenEval-shapes' report of
    the reconstructions (overall = exact-read rate), their pixel MSE in [-1, 1], and the codes in use."""
    vq.eval()
    tokens = torch.cat([umm2.vq_encode(vq, images[i:i + batch]) for i in range(0, len(images), batch)])
    recon = torch.cat([umm2.vq_decode(vq, tokens[i:i + batch]) for i in range(0, len(tokens), batch)])
    vq.train()
    mse = F.mse_loss(2 * recon - 1, umm2.vq_pixels(vq, images.to(recon.device))).item()
    return shapes.generation_report(recon.cpu(), scenes) | {"mse": mse, "codes_used": len(tokens.unique())}


def pixel_loss(reconstruction, target, object_weight: float) -> torch.Tensor:
    """Weighted mean squared error, pixels whose target is not the world's background colour weighted
    object_weight: objects cover ~10% of a shapes image, small ones ~1% each, and with plain MSE the
    tokenizer first learns to draw background alone."""
    background = torch.tensor(shapes.BACKGROUND, device=target.device).view(1, 3, 1, 1) / 127.5 - 1
    weight = 1 + (object_weight - 1) * ((target - background).abs().amax(1, keepdim=True) > 1e-3)
    return ((reconstruction - target) ** 2 * weight).mean() / weight.mean()


def restart_dead_codes(vq, usage: torch.Tensor, latents: torch.Tensor) -> int:
    """Codes no image chose since the last restart (usage summed over ranks) move onto random encoder
    outputs of this batch (master's, then broadcast): the number restarted."""
    dead = usage == 0
    if dead.any():
        weight = vq.quantize.embedding.weight
        with torch.no_grad():
            pool = latents.detach().flatten(0, 1)
            weight[dead] = pool[torch.randint(0, len(pool), (int(dead.sum()),), device=pool.device)].to(weight.dtype)
        broadcast_from_master([weight])
    return int(dead.sum())


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_batch = rt.per_rank(cfg.batch_size, "batch_size")
    # ---- data (first: the image size sizes the tokenizer)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"))
    val = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    train_images, val_images = load_images(train), load_images(val)
    val_scenes = shapes.scenes_of(val)
    # ---- model
    if state is not None:
        vq = umm2.load_vq(cfg.out_dir, remedy=RESUME_REMEDY)
    else:
        vq = umm2.build_vq(train_images.shape[-1], cfg.codebook_size, cfg.code_dim, cfg.channels, cfg.levels, cfg.res_blocks)
    vq.to(rt.device).train()
    params = list(vq.parameters())
    rt.print(f"vq: {sum(p.numel() for p in params) / 1e6:.2f}M parameters, {vq.config.num_patches ** 2} tokens of "
             f"{cfg.codebook_size} codes per {train_images.shape[-1]}-px image")
    broadcast_from_master(params)  # one model on every rank (per-rank seeds drew the random inits)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, usage = 0, torch.zeros(cfg.codebook_size, dtype=torch.long, device=rt.device)
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step, usage = state["step"], state["usage"].to(rt.device)
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    # ---- loop
    t0, t_log, guard = time.time(), time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="pretrain_vq")
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        images = train_images[torch.randint(0, len(train), (local_batch,))].to(rt.device)
        with rt.autocast(training=True):
            out = umm2.vq_autoencode(vq, images)
        pixel = pixel_loss(out.reconstruction, umm2.vq_pixels(vq, images), cfg.object_weight)
        loss = pixel + out.codebook_loss + cfg.beta * out.commitment_loss
        if not guard.passed(all_finite(loss), step + 1):
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        usage += torch.bincount(out.tokens.flatten(), minlength=cfg.codebook_size)
        step += 1
        bar.update(1)
        if cfg.restart_interval and step % cfg.restart_interval == 0:
            restarted = restart_dead_codes(vq, all_reduce_mean(usage.float()), out.latents)
            usage.zero_()
            if restarted:
                rt.print(f"step {step} restarted {restarted} dead codes")
        if step % cfg.log_interval == 0:
            pixel_avg, loss_avg = (all_reduce_mean(v.detach()).item() for v in (pixel, loss))
            dt, t_log = (time.time() - t_log) / cfg.log_interval, time.time()
            rt.print(f"step {step} loss {loss_avg:.4f} pixel {pixel_avg:.4f} lr {lr:.2e} "
                     f"step_time {dt * 1000:.0f}ms elapsed {time.time() - t0:.0f}s")
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and rt.master and val_scenes is not None:
            rt.print(f"eval step {step} " + shapes.format_report(probe(vq, val_images, val_scenes)))
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, Tokenizer(vq), ("vq",), opt, step, vars(cfg), {"usage": usage.cpu()})
    bar.close()
    end_run(rt, step, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
