"""Unified-GRPO stage 1, cold start: gently tie encoder and decoder with a semantic reconstruction loss.

The encoder captions each image; the caption's TEXT goes through a fresh generate-role turn of the same
LLM, exactly as inference encodes it, then through the projector into a few-step sampler run WITH
gradients; the reconstruction is scored by the reward backbone. Loss (DESIGN §4.3):

    L = mean(1 - cos(f(x_hat), f(x)))  +  ce_weight * CE(caption tokens)  +  anchor_weight * drift

f(x) is fixed (no grad); the gradient flows through the sampler into the DiT, the projector and the
LLM's LoRA (through its encoding of the caption text). The text is the auto-encoder's only channel: the
hidden states of the captioning pass attend to the image tokens, and conditioning on them would let
image information reach the decoder around the caption, which inference never allows
(`decoder_condition`; a test checks that two images with the same caption condition the decoder
identically). The sampler is unguided (CFG would double the cost of the differentiable sampler). The
captions are the encoder's own samples, so the cross-entropy keeps captioning as it was (no new text is
taught here: what to say is left to RL). The LoRA lives in the LLM that encodes every caption for the
decoder, so the conditioning of the batch's true long captions is anchored to the adapters-off one
(captioner.condition_drift): unanchored, this stage took GenEval-shapes 0.364 -> 0.015 on test; with
anchor_weight 3 it keeps the decoder's 0.37 on val and raises the Unified-Score 33.4 -> 39.2 there
(RESULTS.md). Learning rates are small and the run is short: this stage initialises, it does not solve.

Memory (paper scale, plan.py): the backward goes through every sampler step, the VAE decode and the reward
backbone, so a step runs in micro-batches of images (micro_batch), each with its captions, its share of the
sampler's noise and of the anchor texts, backpropagated alone (the gradients add up to the whole batch's);
grad_checkpointing recomputes each DiT block in the backward instead of keeping its activations for all
sample_steps (and each block of the VAE decoder, and each LLM decoder layer of the three passes with
gradients: the log-probs, the captions' conditioning, the anchor); weights_dtype loads the frozen LLM and
VAE in bf16 while the trained decoder stays fp32.

    python cold_start.py
    torchrun --standalone --nproc_per_node=2 cold_start.py
"""
import contextlib
import os
import sys
import time

import torch
from tqdm import tqdm

import model as M
from captioner import LLM_LORA_TARGETS, Captions, anchor_slices, checkpoint_llm_layers
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, clip_grad_norm, end_run, folder_rule,
    full_tensor, load_full_state, load_optimizer_state, micro_slices, NonFiniteGuard, own_rank, RULES, save_checkpoint,
    set_rng_state, shard, start_run)
from configurator import at_least, configure
from data import load_images, read_jsonl
from lora import load_lora, lora_disabled
from reward import ReconstructionReward, cosine, load_backbone

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    init_from="out/pretrain_decoder",  # UAE checkpoint (pretrained encoder + decoder)
    weights_dtype="float32",  # dtype the frozen LLM and VAE are loaded in (paper: bfloat16, half the memory); the trained projector, DiT and adapters stay fp32
    image_size=0,  # side the images are resized and centre-cropped to on load (0 = the decoder's: model.image_size)
    out_dir="out/cold_start",  # checkpoint directory
    resume=True,  # continue from out_dir if it holds an unfinished run
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # f in the loss (reward.py spec)
    lora_r=16,  # LoRA rank on the text model (paper: 32)
    lora_alpha=32,  # LoRA alpha (paper: 64)
    lr_lora=5e-5,  # AdamW learning rate of the LLM adapters
    lr_decoder=2e-6,  # AdamW learning rate of projector + DiT ("gently"; chosen on the first world's bench: 1e-5 cost 2.6-3.7 Unified-Score there, 2e-6 0.8)
    max_steps=60,  # optimizer steps
    batch_size=16,  # global batch (split over ranks)
    micro_batch=0,  # images per forward/backward on a rank (0 = the rank's whole batch); gradients accumulate to the batch's (paper: memory)
    grad_checkpointing=False,  # recompute each DiT block (through every sampler step), each VAE decoder block and each LLM decoder layer in the backward instead of keeping their activations (paper scale)
    sample_steps=4,  # steps of the differentiable sampler (released code: 10)
    temperature=0.7,  # sampling temperature of the captions read back
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    ce_weight=1.0,  # weight of the caption cross-entropy that keeps captioning intact
    anchor_weight=3.0,  # weight of the drift penalty on the true long captions' conditioning (captioner.condition_drift; val: RESULTS.md)
    grad_clip=1.0,  # max gradient norm
    fsdp=False,  # shard the decoder (text positions, projector, DiT) with FSDP2 over the ranks (torchrun): paper scale
    log_interval=10,  # steps between log lines
    save_interval=60,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    data_dir=folder_rule("train.jsonl"),  # no probe here: no val.jsonl needed
    ce_weight=at_least(0.0),
)


def decoder_condition(model, captions: Captions) -> torch.Tensor:
    """What the decoder sees of an image: only its caption's text, encoded by a generate-role turn of the
    LLM (gradients on), as at inference. Never the captioning pass's states, which saw the image."""
    return model.condition(captions.texts, allow_cut=True)


def backward(model, rt, backbone, captions: Captions, source, anchor_texts, reference, noise, cfg) -> dict:
    """Backpropagate the step's loss in micro-batches of images: each with its captions, its rows of the
    sampler's noise (drawn whole, so the split does not change it) and its anchor texts (the last also
    takes the ""), its terms weighted by their share of the batch so that the gradients add up to the
    whole batch's. With micro-batches (micro_batch > 0) each term, the caption cross-entropy, the
    reconstruction through the sampler and the anchor, is also built in an autocast region of its own and
    backpropagated before the next, so a GPU holds one term's activations at a time; micro_batch 0 runs the
    whole batch's sum in one region and one backward, as the shapes-world runs always did. Backwards run
    under the training attention kernel: grad_checkpointing recomputes blocks there. Returns the loss and
    its terms, summed over the micro-batches."""
    n = len(captions.texts)
    tokens = captions.mask.bool().sum()
    parts = micro_slices(n, cfg.micro_batch)
    split = cfg.micro_batch > 0

    def backpropagate(t: torch.Tensor):
        with rt.attention_kernel(training=True):
            t.backward()

    totals = {"loss": 0.0, "similarity": 0.0, "ce": 0.0, "drift": 0.0}
    for rows, anchors in zip(parts, anchor_slices(parts)):
        c = captions.rows(rows)
        share = len(c.texts) / n
        with contextlib.nullcontext() if split else rt.autocast(training=True):  # whole: one region (nested ones join it)
            with rt.autocast(training=True):
                logp = model.caption_logprobs(c.prompt, c.ids, 1.0)
            if split:
                ce = -torch.where(c.mask.bool(), logp, 0.0).sum() / tokens
                backpropagate(cfg.ce_weight * ce)
            with rt.autocast(training=True):
                x_hat = model.decode_latents(model.sample_ode(decoder_condition(model, c), cfg.sample_steps, noise=noise[rows]))
            if split:
                similarity = cosine(backbone(x_hat), source[rows])
                backpropagate((1 - similarity).mean() * share)
            with rt.autocast(training=True):
                drift = model.drift(anchor_texts, reference, anchors)
        if not split:
            similarity = cosine(backbone(x_hat), source[rows])
            ce = -torch.where(c.mask.bool(), logp, 0.0).sum() / tokens
        loss = (1 - similarity).mean() * share + cfg.ce_weight * ce + cfg.anchor_weight * drift
        backpropagate(cfg.anchor_weight * drift if split else loss)
        for k, v in (("loss", loss), ("similarity", similarity.mean() * share), ("ce", ce), ("drift", drift)):
            totals[k] = totals[k] + v.detach()
    return totals


def checkpoint_activations(model):
    """grad_checkpointing: the blocks of every trained or backpropagated-through network keep only their
    inputs, and the backward recomputes them one at a time: the DiT's at each of the differentiable
    sampler's sample_steps calls, the VAE decoder's (the 1024^2 decode with gradients: ~19 GB an image kept,
    ~10 recomputed) and the LoRA'd LLM's layers in its three passes with gradients (log-probs, the captions'
    conditioning, the anchor; captioner.checkpoint_llm_layers)."""
    model.transformer.enable_gradient_checkpointing()
    model.vae.enable_gradient_checkpointing()
    checkpoint_llm_layers(model.llm)


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_batch = rt.per_rank(cfg.batch_size, "batch_size")
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"), need_images=True)  # images read per step: any dataset size
    model = M.UAE.load(cfg.init_from, dtype=getattr(torch, cfg.weights_dtype), decoder_dtype=torch.float32).to(rt.device)
    model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first caption
    anchors = model.check_texts(train, "caption")  # the anchor's texts: what the decoder learned to read
    size = cfg.image_size or model.image_size
    model.requires_grad_(False)
    lora = model.add_lora("llm", cfg.lora_r, cfg.lora_alpha, LLM_LORA_TARGETS)
    decoder = model.decoder_modules()
    decoder_params = [p for m in decoder for p in m.parameters()]
    for p in decoder_params:
        p.requires_grad_(True)
    broadcast_from_master(lora + decoder_params)  # one model on every rank (per-rank seeds drew the random inits)
    if cfg.grad_checkpointing:
        checkpoint_activations(model)
    if cfg.fsdp:
        shard(decoder, rt.dtype)
        decoder_params = [p for m in decoder for p in m.parameters()]
    params = lora + decoder_params
    opt = torch.optim.AdamW([{"params": lora, "lr": cfg.lr_lora}, {"params": decoder_params, "lr": cfg.lr_decoder}],
                            betas=(0.9, 0.99), weight_decay=0.0)
    step = 0
    if state is not None:
        load_lora(model.llm, os.path.join(cfg.out_dir, "lora_llm"))
        for m, sd in zip(decoder, state["decoder"]):
            load_full_state(m, sd)
        load_optimizer_state(opt, [model.llm] + decoder if cfg.fsdp else [], state["optimizer"])
        step = state["step"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    backbone = load_backbone(cfg.reward_backbone, rt.device)
    reward_fn = ReconstructionReward(backbone)
    t0, guard = time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
        reward_fn.load_cache(own_rank(state.get("rank_state")))
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="cold_start")
    while step < cfg.max_steps:
        idx = torch.randint(0, len(train), (local_batch,))
        x = load_images([train[i] for i in idx.tolist()], size)
        model.eval()
        with rt.autocast():
            captions = model.caption(x, 1, cfg.temperature, cfg.max_new_tokens)  # the encoder's own words
        model.train()
        anchor_texts = [anchors[i] for i in idx.tolist()] + [""]  # what the decoder learned to read
        with torch.no_grad(), lora_disabled(model.llm), rt.autocast():
            reference = model.condition(anchor_texts)
        noise = torch.randn(model.latent_shape(local_batch), device=rt.device)  # the sampler's start
        source = reward_fn.source_features(x.float().div(255).to(rt.device), idx.tolist())
        opt.zero_grad(set_to_none=True)
        stats = backward(model, rt, backbone, captions, source, anchor_texts, reference, noise, cfg)
        loss = stats["loss"]
        if not guard.passed(all_finite(loss), step + 1):
            continue
        all_reduce_grads(params)
        clip_grad_norm(params, cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0:
            rt.print(f"step {step} loss {all_reduce_mean(loss).item():.4f} "
                     f"similarity {all_reduce_mean(stats['similarity']).item():.4f} "
                     f"ce {all_reduce_mean(stats['ce']).item():.4f} drift {all_reduce_mean(stats['drift']).item():.5f} elapsed {time.time() - t0:.0f}s | {captions.texts[0]}")
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, model, ("llm", "transformer"), opt, step, vars(cfg),
                            {"decoder": [{k: full_tensor(v) for k, v in m.state_dict().items()} for m in decoder]},
                            rank_state=reward_fn.cache_state(), sharded=[model.llm] + decoder if cfg.fsdp else ())
    bar.close()
    end_run(rt, step, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
