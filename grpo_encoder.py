"""Unified-GRPO stage 2, Generation for Understanding: RL of the encoder on the reconstruction reward.

For each image the policy (LLM + LoRA) samples G captions; the frozen decoder (the same LLM with its
adapters off, projector, DiT) redraws the image from each caption; the reward is cos(f(x), f(x_hat))
with f the reward CLIP. Captions that let the decoder rebuild the image better get positive group-
relative advantages, so the encoder learns to say what it used to leave out (DESIGN §4.4). The adapters
are merged into the one LLM that also encodes captions for the decoder, so a penalty on the drift of
that conditioning (condition_drift) keeps the decoder's input where pretraining left it: unanchored, the
decoder's drawing of the true captions collapsed while the reward rose (RESULTS.md).

init_from's model.json picks the architecture (checkpoint_parts.load_autoencoder). A UMM2's frozen decoder is
its one LLM with the adapters off drawing VQ tokens with guidance (Janus-Pro: 5), and the anchor holds that
LLM's states over the captions' T2I prompts; the model supplies the rendering (model.redraw).

Memory (paper scale, plan.py): micro_batch sets how many captions go through one forward/backward in the
update, each with its share of the drift anchor (backpropagated with it, so the anchor's activations are
bounded by a micro-batch too), and how many the frozen decoder draws at once in the rollout;
grad_checkpointing recomputes each LLM decoder layer in the update's backward, so a micro-batch keeps only
the layers' inputs instead of every layer's activations (captioner.checkpoint_llm_layers).

    python grpo_encoder.py
    torchrun --standalone --nproc_per_node=2 grpo_encoder.py
    torchrun --nproc_per_node=8 grpo_encoder.py --init_from=out/paper_cold_start --data_dir=/data/longcap \
        --reward_backbone=open_clip:ViT-L-14-quickgelu:/ckpt/ViT-L-14.pt   # paper scale (README)

Headline (fourth run, today's defaults, 2,000 test scenes): small-object recall 0.006 -> 0.775, precision
0.996, attribute accuracy 0.878, Unified-Score (three judges independent of the reward) 20.2 -> 75.9
against a ceiling of 93.9: 75.5% of the gap closed.
Every measurement, with its command, is in RESULTS.md.

Writes out_dir/: the checkpoint (LoRA also in the peft layout), log.jsonl (one line per step) and
reward_curve.png.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import shapes
from captioner import LLM_LORA_TARGETS, anchor_slices, checkpoint_llm_layers
from checkpoint_parts import load_autoencoder
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, checkpoint_rule, end_run, group_reward_stats,
    micro_slices, NonFiniteGuard, own_rank, RULES, save_checkpoint, set_rng_state, start_run)
from configurator import at_least, configure, must, one_of
from data import load_images, read_jsonl
from grpo import grpo_loss
from lora import load_lora, lora_disabled
from reward import ReconstructionReward, group_advantages, load_backbone

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    init_from="out/cold_start",  # UAE or UMM2 checkpoint to start from (the reference policy)
    weights_dtype="float32",  # dtype the frozen weights are loaded in (paper: bfloat16, half the memory; adapters stay fp32)
    image_size=0,  # side the images are resized and centre-cropped to on load (0 = the decoder's: model.image_size)
    out_dir="out/grpo_encoder",  # checkpoint directory
    resume=True,  # continue from out_dir if it holds an unfinished run
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # f in cos(f(x), f(x_hat)) (reward.py spec)
    # policy
    lora_r=16,  # LoRA rank on every linear of the text model (paper: 32)
    lora_alpha=32,  # LoRA alpha (paper: 64)
    lr=2e-4,  # AdamW learning rate of the adapters
    weight_decay=0.0,  # AdamW weight decay
    grad_clip=1.0,  # max gradient norm
    # rollout
    max_steps=760,  # RL steps (val200: Unified-Score 52.6 at 760, 52.1 at 960: the plateau; RESULTS.md)
    images_per_step=8,  # B source images per step (global; each group lives on one rank)
    group_size=8,  # G captions per image
    temperature=0.7,  # caption sampling temperature (the paper's); log-probs use the same
    micro_batch=0,  # captions per forward/backward in the update (with their share of the drift anchor) and per decoder pass in the rollout (0 = the rank's all; paper: memory)
    grad_checkpointing=False,  # recompute each LLM decoder layer in the update's backward instead of keeping its activations (paper scale; the frozen decoder runs without gradients)
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    decode_steps=10,  # Euler steps of the frozen decoder (UAE; a UMM2 draws its image tokens one by one)
    cfg_scale=1.0,  # guidance of the frozen decoder's reward renders (UAE val: 1.0 scored +2.8 Unified-Score over 1.25 at 25% less time per step; RESULTS.md; UMM2: Janus-Pro's 5)
    compile=True,  # torch.compile the frozen DiT (UMM2: its VQ decoder; model.compile_decoder)
    # loss
    mu=1,  # policy updates per rollout (1: old log-probs = logp.detach(), no extra forward)
    clip_eps=0.2,  # PPO clip range (low side)
    clip_eps_high=0.28,  # high side (DAPO's clip-higher keeps exploration alive)
    beta=0.04,  # k3 KL weight against the reference (adapters off)
    aggregation="token",  # "token" (length-neutral) or "sequence"
    anchor_weight=1.0,  # weight of the conditioning-drift penalty that keeps the merged LLM a valid text encoder for the decoder (condition_drift)
    # evaluation / logging
    eval_interval=40,  # steps between val probes
    probe_n=100,  # fixed val images for the small-object-recall probe (greedy captions)
    log_interval=1,  # steps between log lines
    save_interval=40,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    init_from=checkpoint_rule(kind="UAE or UMM2"),  # the architecture is the checkpoint's (checkpoint_parts.load_autoencoder)
    images_per_step=at_least(1),
    decode_steps=at_least(1),
    mu=at_least(1),
    clip_eps=must(lambda v, c: 0 < v < 1, "in (0, 1): the ratio is clipped to [1 - clip_eps, 1 + clip_eps_high]"),
    clip_eps_high=at_least(0.0),
    aggregation=one_of("token", "sequence"),
)


@torch.no_grad()
def rollout(model, rt, reward_fn, images, keys, cfg) -> dict:
    """G captions per image from the policy, redrawn by the frozen decoder (model.redraw), scored against the source."""
    model.eval()
    t0 = time.time()
    with rt.autocast():
        captions = model.caption(images, cfg.group_size, cfg.temperature, cfg.max_new_tokens)
    t1 = time.time()
    with lora_disabled(model.llm), rt.autocast():  # the decoder (and the LLM's reading of captions for it) stays frozen
        recon, anchor_texts, reference = model.redraw(captions.texts, cfg.decode_steps, cfg.cfg_scale, cfg.micro_batch)
    t2 = time.time()
    sources = images.repeat_interleave(cfg.group_size, 0).float().div(255).to(rt.device)
    rewards = reward_fn.reconstruction_reward(sources, recon, keys=[k for k in keys for _ in range(cfg.group_size)])
    model.train()
    return {"captions": captions, "rewards": rewards.float(), "recon": recon,
            "anchor_texts": anchor_texts, "reference_condition": reference,
            "seconds": {"caption": t1 - t0, "decode": t2 - t1, "reward": time.time() - t2}}


def policy_step(model, rt, opt, params, out, advantages, cfg) -> dict:
    """mu clipped-surrogate updates on one rollout (+ the anchor on the decoder's conditioning), each over
    micro-batches of captions whose losses add up to the whole batch's. Each micro-batch also carries its
    rows of the anchor set (its captions; the last also the "": Captioner.drift), backpropagated with it, so no
    micro-batch holds the whole set's activations. Returns loss stats (fp32)."""
    captions = out["captions"]
    mask = captions.mask.float()
    slices = micro_slices(len(mask), cfg.micro_batch)
    chunks = [captions.rows(rows) for rows in slices]
    old = ref = [None] * len(chunks)
    if cfg.mu > 1:  # stored old log-probs, teacher-forced before any update
        with torch.no_grad(), rt.autocast():
            old = [model.caption_logprobs(c.prompt, c.ids, cfg.temperature) for c in chunks]
    if cfg.beta != 0:
        with torch.no_grad(), lora_disabled(model.llm), rt.autocast():
            ref = [model.caption_logprobs(c.prompt, c.ids, cfg.temperature) for c in chunks]
    tokens_per_rank = all_reduce_mean(mask.sum())  # "token" aggregation over every rank's captions (grpo_loss)
    for _ in range(cfg.mu):
        opt.zero_grad(set_to_none=True)
        totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "drift": 0.0}
        for rows, anchors, c, c_old, c_ref in zip(slices, anchor_slices(slices), chunks, old, ref):
            m = c.mask.float()
            with rt.autocast():  # a region of its own: autocast's cached bf16 copies of the adapters are not shared
                drift = model.drift(out["anchor_texts"], out["reference_condition"], anchors, allow_cut=True)
            with rt.autocast():
                logp = model.caption_logprobs(c.prompt, c.ids, cfg.temperature)
            logp = torch.where(m.bool(), logp, 0.0)
            loss, stats = grpo_loss(logp, logp.detach() if c_old is None else c_old,
                                    None if c_ref is None else torch.where(m.bool(), c_ref, 0.0), advantages[rows], m,
                                    cfg.clip_eps, cfg.clip_eps_high, cfg.beta, cfg.aggregation,
                                    return_stats=True, tokens_per_rank=tokens_per_rank)
            if cfg.aggregation == "sequence":  # a chunk's mean over its rows, weighted to the batch's mean
                loss = loss * (len(c.ids) / len(mask))
            loss = loss + cfg.anchor_weight * drift  # this micro-batch's share of the anchor
            if not all_finite(loss):
                return {**totals, "finite": False}
            loss.backward()
            share = m.sum() / mask.sum().clamp(min=1)  # the stats are token means over the whole batch
            totals["loss"] = totals["loss"] + loss.detach()
            totals["kl"] = totals["kl"] + stats["kl"] * share
            totals["clip_fraction"] = totals["clip_fraction"] + stats["clip_fraction"] * share
            totals["drift"] = totals["drift"] + drift.detach()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
    return {**totals, "finite": True}


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_images = rt.per_rank(cfg.images_per_step, "images_per_step")  # an image's group stays on one rank
    # ---- data (every line checked before any model is loaded)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"), need_caption=False, need_images=True)  # images read per step
    probe_records = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"), need_caption=False)[:cfg.probe_n]
    probe_scenes = shapes.scenes_of(probe_records)
    # ---- model: the reference is init_from; the policy is it + LoRA on the text model
    model = load_autoencoder(cfg.init_from, dtype=getattr(torch, cfg.weights_dtype)).to(rt.device)  # UAE or UMM2
    model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first caption
    size = cfg.image_size or model.image_size
    model.requires_grad_(False)
    if cfg.compile:
        model.compile_decoder()
    params = model.add_lora("llm", cfg.lora_r, cfg.lora_alpha, LLM_LORA_TARGETS)
    if cfg.grad_checkpointing:
        checkpoint_llm_layers(model.llm)  # acts in policy_step's backward (training mode, gradients on)
    broadcast_from_master(params)  # one model on every rank (per-rank seeds drew the random inits)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step, history = 0, []
    if state is not None:
        load_lora(model.llm, os.path.join(cfg.out_dir, "lora_llm"))
        opt.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    rt.print(f"policy: {sum(p.numel() for p in params) / 1e6:.3f}M LoRA parameters on the LLM")
    reward_fn = ReconstructionReward(load_backbone(cfg.reward_backbone, rt.device))
    probe_images = load_images(probe_records, size)
    # ---- loop
    t_start, guard = time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
        reward_fn.load_cache(own_rank(state.get("rank_state")))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="grpo_encoder")
    while step < cfg.max_steps:
        t0 = time.time()
        idx = torch.randint(0, len(train), (local_images,))
        out = rollout(model, rt, reward_fn, load_images([train[i] for i in idx.tolist()], size), idx.tolist(), cfg)
        rewards = out["rewards"]
        if not all_finite(rewards):
            stats = {"finite": False}
        else:
            advantages = group_advantages(rewards, cfg.group_size)
            t1 = time.time()
            stats = policy_step(model, rt, opt, params, out, advantages, cfg)
            out["seconds"]["policy"] = time.time() - t1
        if not guard.passed(stats["finite"], step + 1):
            continue
        step += 1
        bar.update(1)
        row = {"step": step, **group_reward_stats(rewards, cfg.group_size),
               "kl": all_reduce_mean(stats["kl"].float()).item(), "drift": all_reduce_mean(stats["drift"].detach()).item(),
               "clip_fraction": all_reduce_mean(stats["clip_fraction"]).item(),
               "loss": all_reduce_mean(stats["loss"].float()).item(),
               "caption_length": all_reduce_mean(out["captions"].mask.float().sum(1).mean()).item(),
               "seconds": time.time() - t0, **{f"t_{k}": v for k, v in out["seconds"].items()}}
        history.append(row)
        if step % cfg.log_interval == 0:
            rt.print(f"step {step} reward {row['reward_mean']:.4f} ± {row['reward_std']:.4f} zero_std {row['zero_std_groups']:.2f} "
                     f"kl {row['kl']:.4f} drift {row['drift']:.5f} clip {row['clip_fraction']:.3f} len {row['caption_length']:.1f} "
                     f"loss {row['loss']:.4f} time {row['seconds']:.1f}s | {out['captions'].texts[0]}")
        if rt.master and probe_scenes is not None and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            report = shapes.probe_captioner(model, rt, probe_images, probe_scenes, cfg.max_new_tokens, step)
            history[-1]["probe"] = {k: v for k, v in report.items() if k != "example"}
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, model, ("llm",), opt, step, vars(cfg), history=history,
                              rank_state=reward_fn.cache_state())
    bar.close()
    end_run(rt, step, t_start)


if __name__ == "__main__":
    main(sys.argv[1:])
