"""Unified-GRPO stage 3, Understanding for Generation: Flow-GRPO of the decoder on the reconstruction reward.

The RL-trained encoder captions each source image; the decoder (DiT + LoRA on its attention) draws G
images per caption with the SDE sampler, recording each step's Gaussian log-prob; the reward is the
similarity of each image to its SOURCE, so the decoder learns to use every detail the caption gives
(DESIGN §4.5; Flow-GRPO, Liu et al. 2025). Per-timestep loss via grpo.grpo_loss: ratio of step
log-probs, clip range ~1e-4, KL on the predicted means against the reference (adapters off).

    python grpo_decoder.py
    torchrun --standalone --nproc_per_node=2 grpo_decoder.py

Denoising reduction: train with train_steps sampling steps, evaluate with eval_steps. sde_steps > 0
makes only the first sde_steps steps stochastic (and trained), the rest ODE, as in Flow-GRPO-Fast.

Both architectures, chosen by init_from's model.json (checkpoint_parts.load_autoencoder). A UMM2 (umm2.py, Janus) draws
each image as VQ tokens, one by one, from the guided distribution softmax((u + s (c - u)) / T); the update is
token-level GRPO on them (ratio of the teacher-forced token log-probs, clip range clip_eps: token-level GRPO's
0.2 rather than Flow-GRPO's 1e-4, k3 KL to the same LLM with its adapters off), the LoRA on that one LLM, the
captions from it with the adapters off. The model supplies the rollout and the log-probs (decoder_rollout,
decoder_units, decoder_logprobs); what the on-policy check compares is in either case the log-prob of the
distribution a sample was drawn from.

Headline (fourth run, today's defaults, 2,000 test scenes, from the true complete captions): GenEval-shapes
0.876 -> 0.890 (McNemar p 0.026), >=3 objects 0.859 -> 0.867, extra objects per image 0.108 -> 0.092,
full-loop Unified-Score +0.21 (95% +0.09 .. +0.32). That is level with the pretrained decoder before any
RL (0.892): Understanding for Generation is not shown yet on this world.
Every measurement, with its command, is in RESULTS.md.

Writes out_dir/: checkpoint (the LoRA, the DiT's or the UMM2's LLM's, also in the peft layout), log.jsonl,
reward_curve.png.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import shapes
from checkpoint_parts import load_autoencoder
from common import (
    all_finite, all_reduce_grads, broadcast_from_master, checkpoint_rule, end_run, group_reward_stats, NonFiniteGuard, own_rank,
    RULES, save_checkpoint, set_rng_state, start_run)
from configurator import above, at_least, configure, must, one_of
from data import load_images, read_jsonl
from grpo import grpo_loss
from lora import load_lora, lora_disabled
from reward import ADVANTAGE_STD, ReconstructionReward, group_advantages, load_backbone

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    init_from="out/grpo_encoder",  # UAE or UMM2 checkpoint with the RL-trained encoder
    weights_dtype="float32",  # dtype the frozen weights are loaded in (paper: bfloat16, half the memory; adapters stay fp32)
    image_size=0,  # side the images are resized and centre-cropped to on load (0 = the decoder's: model.image_size)
    out_dir="out/grpo_decoder",  # checkpoint directory
    resume=True,  # continue from out_dir if it holds an unfinished run
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # f in cos(f(x), f(x_hat))
    # policy
    lora_r=16,  # LoRA rank on the DiT attention projections (Flow-GRPO: 32; UMM2: on every linear of its LLM)
    lora_alpha=32,  # LoRA alpha (Flow-GRPO: 64)
    lr=3e-4,  # AdamW learning rate of the adapters
    grad_clip=1.0,  # max gradient norm
    # rollout
    max_steps=30,  # RL steps
    captions_per_step=40,  # source images (one caption each) per step, global (RESULTS.md: 4 lowered the Unified-Score)
    group_size=8,  # G images per caption
    greedy_captions=True,  # captions from the encoder: greedy (True) or sampled at temperature
    temperature=0.7,  # caption temperature when sampled
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    train_steps=8,  # SDE sampling steps during training (denoising reduction; UAE)
    eval_steps=20,  # ODE steps when evaluating (UAE)
    noise_level=0.7,  # a in std_t = a sqrt(sigma / (1 - sigma)) (UAE)
    sde_steps=0,  # the first sde_steps steps are stochastic and trained, the rest ODE (0 = all but the last; UAE)
    cfg_scale=1.25,  # guidance, the same at sampling and in the update (README "guidance"; UMM2: Janus-Pro's 5)
    image_temperature=1.0,  # UMM2: temperature of the image tokens' guided distribution, the same at sampling and in the update (Janus-Pro: 1)
    shared_noise=False,  # a caption's G images start from the same initial latent (DanceGRPO; UAE only)
    micro_batch=0,  # trajectories per DiT forward, in sampling and in the update alike (0 = the rank's all; paper: memory)
    timestep_fraction=0.6,  # fraction of the SDE steps trained per rollout (UAE; a UMM2 trains every image token)
    # loss
    clip_eps=1e-4,  # ratio clip range (Flow-GRPO; UMM2, token-level GRPO: 0.2)
    adv_clip=5.0,  # advantages clipped to +-adv_clip
    advantage_std="group",  # normalise advantages by each group's reward std, or this rank's whole batch's ("batch")
    beta=0.01,  # KL weight (UAE: on the predicted means, step_kl; UMM2: k3 on the image tokens)
    # evaluation / logging
    eval_interval=20,  # steps between GenEval-shapes probes
    eval_n=100,  # val true long captions per probe
    log_interval=1,  # steps between log lines
    save_interval=20,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    init_from=checkpoint_rule(kind="UAE or UMM2"),  # the architecture is the checkpoint's (checkpoint_parts.load_autoencoder)
    captions_per_step=at_least(1),
    train_steps=at_least(2, "the last step is a plain ODE step: one SDE step to train needs two"),
    eval_steps=at_least(1),
    noise_level=above(0.0, "the SDE's noise: at 0 its steps have no log-prob to train"),
    image_temperature=above(0.0, "the image tokens' sampling temperature"),
    sde_steps=at_least(0, "0 = all but the last"),
    timestep_fraction=must(lambda v, c: 0 < v <= 1, "in (0, 1]"),
    clip_eps=must(lambda v, c: 0 < v < 1, "in (0, 1)"),
    adv_clip=above(0.0),
    advantage_std=one_of(*ADVANTAGE_STD),
)


@torch.no_grad()
def rollout(model, rt, reward_fn, images, keys, cfg) -> dict:
    """One caption per source image from the frozen encoder, G images per caption drawn by the policy, each
    scored against its source. The model draws and records the log-probs (model.decoder_rollout: a UAE's SDE
    trajectories, a UMM2's guided image tokens)."""
    model.eval()
    t0 = time.time()
    part, _ = model.DECODER_LORA
    with rt.autocast(), lora_disabled(getattr(model, part)):  # the encoder as init_from left it (a UMM2's is the policy's LLM)
        texts = model.describe(images, cfg.temperature, cfg.max_new_tokens, cfg.greedy_captions)
    t1 = time.time()
    with rt.autocast():
        out = model.decoder_rollout(texts, cfg)
    t2 = time.time()
    sources = images.repeat_interleave(cfg.group_size, 0).float().div(255).to(rt.device)
    rewards = reward_fn.reconstruction_reward(sources, out["images"], keys=[k for k in keys for _ in range(cfg.group_size)])
    model.train()
    return out | {"texts": texts, "rewards": rewards.float(),
                  "seconds": {"caption": t1 - t0, "sample": t2 - t1, "reward": time.time() - t2}}


def policy_step(model, rt, opt, params, out, advantages, cfg, check_on_policy: bool) -> dict:
    """Clipped surrogate + KL against the reference (adapters off) on each unit the model gives
    (model.decoder_units: a UAE's chosen SDE timesteps, a UMM2's image tokens all at once), over the
    rollout's micro-batches (out["chunks"]), gradients summed over units and micro-batches."""
    units = model.decoder_units(out, cfg.timestep_fraction)
    opt.zero_grad(set_to_none=True)
    totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "max_ratio_error": 0.0}
    for unit in units:
        for c in out["chunks"]:  # the sampler's layout, so the ratio is exactly 1 on-policy
            share = len(advantages[c]) / len(advantages)  # of the mean over samples; then over units
            with rt.autocast():
                logp, old, ref, kl = model.decoder_logprobs(out, unit, c)
            if check_on_policy and unit == units[0]:
                error = (torch.exp(logp.detach() - old) - 1).abs().max().item()
                totals["max_ratio_error"] = max(totals["max_ratio_error"], error)
            loss, stats = grpo_loss(logp, old, ref, advantages[c], torch.ones_like(logp), cfg.clip_eps, None, cfg.beta,
                                    kl=kl, return_stats=True)
            if not all_finite(loss):
                return {**totals, "finite": False}
            (loss * share / len(units)).backward()
            totals["loss"] += loss.item() * share / len(units)
            totals["kl"] += stats["kl"].item() * share / len(units)
            totals["clip_fraction"] += stats["clip_fraction"].item() * share / len(units)
    all_reduce_grads(params)
    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    opt.step()
    return {**totals, "finite": True}


@torch.no_grad()
def probe(model, rt, captions, scenes, cfg, step: int) -> dict:
    """GenEval-shapes of the current decoder on the val captions, printed as one `eval step` line."""
    model.eval()
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    with rt.autocast():
        images = model.generate(captions, steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, generator=generator, batch_size=50)
    model.train()
    report = shapes.generation_report(images, scenes)
    rt.print(f"eval step {step} " + shapes.format_report(report))
    return report


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local = rt.per_rank(cfg.captions_per_step, "captions_per_step")  # a caption's group stays on one rank
    # ---- data (every line checked before any model is loaded; the probe's captions once the tokenizer is there)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"), need_caption=False, need_images=True)  # images read per step
    val = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    val_scenes = shapes.scenes_of(val)
    model = load_autoencoder(cfg.init_from, dtype=getattr(torch, cfg.weights_dtype)).to(rt.device)  # UAE or UMM2
    model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first caption
    val_captions = model.check_texts(val, "caption")
    size = cfg.image_size or model.image_size
    model.requires_grad_(False)
    part, targets = model.DECODER_LORA  # UAE: the DiT; UMM2: the one LLM
    params = model.add_lora(part, cfg.lora_r, cfg.lora_alpha, targets)
    broadcast_from_master(params)  # one model on every rank (per-rank seeds drew the random inits)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
    step, history = 0, []
    if state is not None:
        load_lora(getattr(model, part), os.path.join(cfg.out_dir, f"lora_{part}"))
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    rt.print(f"policy: {sum(p.numel() for p in params) / 1e6:.3f}M LoRA parameters on {type(model).__name__}.{part}")
    reward_fn = ReconstructionReward(load_backbone(cfg.reward_backbone, rt.device))
    # the on-policy check runs before any update: not in a resumed run, whose log then matches an unbroken run's
    t_start, guard, first = time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir), state is None
    if rt.master and val_scenes is not None and step == 0:  # where the curve starts: the decoder before RL
        probe(model, rt, val_captions, val_scenes, cfg, step)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
        reward_fn.load_cache(own_rank(state.get("rank_state")))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="grpo_decoder")
    while step < cfg.max_steps:
        t0 = time.time()
        idx = torch.randint(0, len(train), (local,))
        out = rollout(model, rt, reward_fn, load_images([train[i] for i in idx.tolist()], size), idx.tolist(), cfg)
        rewards = out["rewards"]
        stats = {"finite": False}
        if all_finite(rewards):
            advantages = group_advantages(rewards, cfg.group_size, cfg.advantage_std).clamp(-cfg.adv_clip, cfg.adv_clip)
            t1 = time.time()
            stats = policy_step(model, rt, opt, params, out, advantages, cfg, check_on_policy=first)
            out["seconds"]["policy"] = time.time() - t1
        if not guard.passed(stats["finite"], step + 1):
            continue
        if first:  # sampling and the update must see the same numbers: ratio exactly 1 before any update
            error = stats["max_ratio_error"]
            rt.print(f"on-policy check: max |ratio - 1| = {error:.2e} "
                     + ("(<= 1e-5: ok)" if error <= 1e-5 else "WARNING > 1e-5: sampling and update compute different log-probs"))
            first = False
        step += 1
        bar.update(1)
        row = {"step": step, **group_reward_stats(rewards, cfg.group_size),
               "kl": stats["kl"], "clip_fraction": stats["clip_fraction"], "loss": stats["loss"],
               "max_ratio_error": stats["max_ratio_error"], "seconds": time.time() - t0,
               **{f"t_{k}": v for k, v in out["seconds"].items()}}
        history.append(row)
        if step % cfg.log_interval == 0:
            rt.print(f"step {step} reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f} kl {row['kl']:.5f} "
                     f"clip {row['clip_fraction']:.3f} loss {row['loss']:.4f} time {row['seconds']:.1f}s")
        if rt.master and val_scenes is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            history[-1]["probe"] = probe(model, rt, val_captions, val_scenes, cfg, step)
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, model, (part,), opt, step, vars(cfg), history=history,
                              rank_state=reward_fn.cache_state())
    bar.close()
    end_run(rt, step, t_start)


if __name__ == "__main__":
    main(sys.argv[1:])
