"""Stage 2: flow-matching pretraining of projector + MM-DiT on a caption corpus, the LLM frozen.

The decoder learns to turn the LLM's hidden states of a `generate`-role caption into an image; the
paper pretrains it on 700K long captions so it can follow fine-grained text (DESIGN §4.2). On the shapes
world the corpus mixes caption styles of the same images (`captions`): complete long captions, partial
ones that leave details out, and short alt-text, as a T2I model learns from web text. So the decoder
draws a sensible image from any caption, the base captioner's included, and what a caption leaves out
is its guess (trained only on complete long captions it drew almost nothing for short ones: the base
Unified-Score was 6.59). Every training caption must fit the text window (max_text_tokens): a longer
one is an error naming its file and line, never cut.

    python pretrain_decoder.py
    torchrun --standalone --nproc_per_node=2 pretrain_decoder.py
    torchrun --nproc_per_node=8 pretrain_decoder.py config/paper_pretrain_decoder.py --data_dir=/data/longcap

Loss: SD3's rectified flow. x_t = (1 - s) x0 + s eps with s = sigmoid(u), u ~ N(m, 1) (logit-normal
timesteps, Esser et al. 2024 §3.1), shifted by the scheduler's shift s' = k s / (1 + (k - 1) s), target
v = eps - x0, plain MSE. Captions are replaced by the empty string with probability cond_dropout so the
same network gives the unconditional velocity for CFG. The checkpoint holds the EMA weights (what
sampling uses); the raw weights sit in training_state.pt.

The design choices above (x-prediction, standardised text states, timestep shift 3, compiled loss with
the math attention kernel) and their measurements are in RESULTS.md.
"""
import contextlib
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler
from tqdm import tqdm

import model as M
import shapes
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, checkpoint_rule, end_run, folder_rule,
    full_tensor, like_param, lr_at, load_optimizer_state, micro_slices, NonFiniteGuard, reshard, RULES, save_checkpoint,
    set_rng_state, shard, start_run)
from configurator import above, at_least, between, configure, must, one_of, only_if, parses
from data import caption_mix, load_images, read_jsonl

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    captions="caption:0.4,partial_caption:0.35,short_caption:0.25",  # the corpus: JSONL caption fields and their sampling weights (paper: caption:1)
    init_from="out/pretrain_encoder",  # UAE checkpoint whose LLM conditions the decoder, or "pretrained" (paper)
    qwen_dir="",  # with init_from="pretrained": local Qwen2.5-VL-3B-Instruct directory
    sd3_dir="",  # with init_from="pretrained": local SD3.5-Large diffusers pipeline directory
    weights_dtype="float32",  # with init_from="pretrained": dtype the checkpoints are loaded in
    out_dir="out/pretrain_decoder",  # checkpoint directory
    resume=True,  # continue from out_dir if it holds an unfinished run
    image_size=0,  # resize images to this square size on load (0 = as stored; paper: 1024)
    cache_features=True,  # precompute VAE latents and frozen-LLM hidden states once (shapes scale)
    new_decoder=True,  # build a fresh DiT + projector of the sizes below (shapes); False keeps init_from's (paper)
    vae_dir="data/shapes/vae",  # with new_decoder: the world's VAE the DiT works in ("" keeps init_from's)
    dit_layers=4,  # MM-DiT joint blocks
    dit_heads=4,  # attention heads
    dit_head_dim=32,  # width per head (DiT width = heads x head_dim)
    dit_patch=4,  # latent patch size: 12x12 latents -> 9 image tokens, one per grid cell (patch 2: 36 tokens)
    qk_norm="rms_norm",  # RMSNorm on queries and keys, as in SD3.5 ("" = none, as in SD3)
    joint_dim=128,  # projector output = DiT encoder_hidden_states width
    projector_hidden=512,  # projector MLP width (paper: 8192)
    max_text_tokens=56,  # with new_decoder: tokens of the generate turn the decoder reads (6-object long captions take <= 55)
    text_positions=True,  # with new_decoder: learned text-position embedding into the projector (model.replace_decoder)
    prediction="sample",  # with new_decoder: the DiT outputs x0 ("sample") or the velocity ("velocity", SD3); see model.velocity
    # optimisation
    max_steps=16000,  # optimizer steps (val: GenEval-shapes 0.615 / 0.855 / 0.845 / 0.865 at 8k / 12k / 14k / 16k, the plateau; RESULTS.md)
    batch_size=64,  # global batch (split over ranks)
    micro_batch=0,  # samples per forward/backward (0 = the rank's whole batch); gradients accumulate to the batch
    fsdp=False,  # shard text positions, projector and DiT over the ranks with FSDP2 (common.shard; torchrun): paper scale
    grad_checkpointing=False,  # recompute each DiT block in the backward instead of keeping its activations (paper scale)
    lr=1e-3,  # AdamW peak learning rate
    warmup=100,  # linear warmup steps
    weight_decay=0.0,  # AdamW weight decay
    grad_clip=1.0,  # max gradient norm
    timestep_shift=3.0,  # with new_decoder: the scheduler's sigma shift, used by training and sampling (SD3: 3.0; RESULTS.md)
    timestep_mean=0.0,  # location m of the logit-normal timestep density (SD3 §3.1; m > 0 favours high noise)
    loss_space="velocity",  # MSE on the velocity (SD3) or on the clean latent x0_hat = x_t - sigma v ("sample": sigma^2-weighted)
    cond_dropout=0.1,  # P(caption -> "") so CFG has an unconditional branch
    ema_decay=0.995,  # EMA of projector + DiT weights, used for sampling and saved
    # evaluation / logging
    eval_interval=2000,  # steps between GenEval-shapes probes
    eval_n=200,  # val captions per probe
    sample_steps=20,  # Euler steps when probing
    cfg_scale=1.25,  # guidance when probing (README "guidance": 3.0 oversaturates this small DiT)
    log_interval=50,  # steps between log lines
    save_interval=1000,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
    compile=True,  # torch.compile the training loss (measured here, math kernel: 146 -> 88 ms per step of 64; 35-55 s to compile)
)
pretrained = lambda cfg: cfg.init_from == "pretrained"
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    captions=parses(caption_mix),  # field:weight,...
    init_from=checkpoint_rule("pretrained"),
    qwen_dir=only_if(pretrained, folder_rule("config.json")),  # a transformers model directory
    sd3_dir=only_if(pretrained, folder_rule("model_index.json")),  # a diffusers pipeline directory
    vae_dir=only_if(lambda cfg: cfg.new_decoder and cfg.vae_dir, folder_rule("config.json")),
    dit_layers=at_least(1),
    dit_heads=at_least(1),
    dit_head_dim=at_least(1),
    dit_patch=at_least(1),  # that it divides the latent side: model.tiny_dit
    qk_norm=one_of("", "rms_norm", "rms_norm_across_heads", "layer_norm", "fp32_layer_norm"),  # diffusers' joint attention
    joint_dim=at_least(1),
    projector_hidden=at_least(1),
    max_text_tokens=at_least(1),  # that the captions fit: corpus
    prediction=one_of("velocity", "sample"),
    timestep_shift=above(0.0),
    timestep_mean=must(lambda v, c: math.isfinite(v), "a finite number"),
    loss_space=one_of("velocity", "sample"),
    cond_dropout=between(0.0, 1.0, "a probability"),
    ema_decay=must(lambda v, c: 0 <= v < 1, "in [0, 1): at 1 the EMA, which the checkpoint holds, never moves"),
)


def corpus(model, records: list[dict], mix: dict[str, float]) -> dict[str, list[str]]:
    """Each mixed field's caption of every record; a missing or empty one, one with a word the tokenizer
    does not know, or one longer than the decoder's window (raise max_text_tokens) is an error naming the
    record's file:line (model.check_texts)."""
    return {field: model.check_texts(records, field) for field in mix}


@torch.no_grad()
def text_features(model, rt, texts, batch=256) -> torch.Tensor:
    out = []
    for i in range(0, len(texts), batch):
        with rt.autocast():
            out.append(model.text_hidden_states(texts[i:i + batch]).to(torch.bfloat16).cpu())
    return torch.cat(out)


@torch.no_grad()
def latents_of(model, rt, images, batch=32) -> torch.Tensor:
    """VAE latents in small bf16 batches (measured here: ~3x faster than fp32 batches of 256)."""
    out = []
    for i in range(0, len(images), batch):
        with rt.autocast():
            out.append(model.encode_images(images[i:i + batch].to(model.device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def set_latent_stats(model, rt, cfg, n=2000):
    """Per-channel shift / scale of the new VAE's latents (mean 0, std 1 per channel) from n train images."""
    records = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"))[:n]
    channels = model.vae.config.latent_channels
    model.latent_shift = torch.zeros(channels, device=rt.device)  # identity first: measure raw latents
    model.latent_scale = torch.ones(channels, device=rt.device)
    raw = latents_of(model, rt, load_images(records, cfg.image_size or None))
    model.latent_shift = raw.mean((0, 2, 3)).to(rt.device)
    model.latent_scale = (1 / raw.std((0, 2, 3))).to(rt.device)
    rt.print("latent shift " + " ".join(f"{v:.2f}" for v in model.latent_shift.tolist())
             + " | scale " + " ".join(f"{v:.2f}" for v in model.latent_scale.tolist()))


@torch.no_grad()
def set_text_stats(model, rt, states):
    """Per-channel mean / std of the frozen LLM's raw states (text_features) of the caption tokens of
    some generate turns (pads are zeros and are left out), so the projector sees standardised inputs
    (model.UAE.project)."""
    states = states.float().flatten(0, 1)
    states = states[M.caption_tokens(states)]
    model.text_shift.copy_(states.mean(0))
    model.text_scale.copy_(1 / states.std(0).clamp(min=1e-6))
    rt.print(f"text states: |mean| {model.text_shift.norm():.2f}, median std {states.std(0).median():.3f}")


def flow_matching_loss(model, x0, hidden, sigma, noise, loss_space: str) -> torch.Tensor:
    """Rectified-flow MSE at x_t = (1 - sigma) x0 + sigma noise: on the velocity noise - x0 (SD3) or on x0."""
    s = sigma.view(-1, 1, 1, 1)
    x_t = (1 - s) * x0 + s * noise
    v = model.velocity(x_t, sigma, model.project(hidden)).float()
    if loss_space == "velocity":
        return F.mse_loss(v, noise - x0)
    return F.mse_loss(x_t - s * v, x0)


@torch.no_grad()
def probe(model, rt, val, scenes, cfg, generator) -> dict:
    """GenEval-shapes from the val scenes' complete long captions, and the mentioned-object recall from
    their short captions (does the decoder draw what a base-style caption names?)."""
    with rt.autocast():
        images = model.generate([r["caption"] for r in val], cfg.sample_steps, cfg.cfg_scale, generator=generator, batch_size=50)
        short = model.generate([r["short_caption"] for r in val], cfg.sample_steps, cfg.cfg_scale, generator=generator, batch_size=50)
    return shapes.generation_report(images, scenes) | {
        "short_mentioned_recall": shapes.mentioned_object_recall([r["short_caption"] for r in val], short)}


def build_model(cfg, rt, sides: tuple[int, int]) -> M.UAE:
    """init_from's UAE; with new_decoder its decoder replaced by a fresh projector + DiT (and VAE). The
    training images' sides (height, width) are checked against the decoder before any work."""
    if cfg.init_from == "pretrained":  # paper scale: the first UAE, straight from the two released checkpoints
        model = M.UAE.from_pretrained(cfg.qwen_dir, cfg.sd3_dir, dtype=getattr(torch, cfg.weights_dtype)).to(rt.device)
    else:
        model = M.UAE.load(cfg.init_from).to(rt.device)
    if cfg.new_decoder:
        if cfg.vae_dir:
            model.vae = AutoencoderKL.from_pretrained(cfg.vae_dir).to(rt.device).requires_grad_(False)
            model.sources.pop("vae", None)
        model.max_text_tokens = cfg.max_text_tokens
        model.scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config, shift=cfg.timestep_shift)
        dit = M.tiny_dit(model.vae, cfg.dit_layers, cfg.dit_heads, cfg.dit_head_dim, cfg.dit_patch, cfg.joint_dim,
                         model.pooled.numel(), cfg.qk_norm or None)
        model.replace_decoder(dit, cfg.projector_hidden, cfg.text_positions, cfg.prediction)
    model.check_image_size(*sides)
    if cfg.new_decoder and cfg.vae_dir:
        set_latent_stats(model, rt, cfg)
    model.llm.requires_grad_(False).eval()
    return model


def new_ema(params) -> list[torch.Tensor]:
    """fp32 copies of the trained parameters (this rank's shards under FSDP), whatever their dtype: with
    decay 0.995 a bf16 EMA rounds most updates away (a steady 1e-5/step drift over 2,000 steps moved a
    bf16 EMA 0.010 against 0.018 in fp32)."""
    return [p.detach().float().clone() for p in params]


@torch.no_grad()
def update_ema(params, ema, decay: float) -> None:
    for p, q in zip(params, ema):
        q.lerp_(p.detach().float(), 1 - decay)


@contextlib.contextmanager
@torch.no_grad()
def ema_weights(params, ema):
    """Swap the EMA weights in (sampling and the checkpoint use them); yields the raw ones, put back after."""
    raw = [p.detach().clone() for p in params]
    for p, e in zip(params, ema):
        p.copy_(e)
    try:
        yield raw
    finally:
        for p, r in zip(params, raw):
            p.copy_(r)


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_batch = rt.per_rank(cfg.batch_size, "batch_size")
    # ---- data (every line checked before any model is built; the captions' words and lengths once the tokenizer is there)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"), need_images=True)  # paper scale: images read per step
    val = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    mix = caption_mix(cfg.captions)
    val_scenes = shapes.scenes_of(val)  # GenEval-shapes needs the true scenes: only the shapes world has them (DESIGN §5)
    # ---- model
    model = build_model(cfg, rt, (cfg.image_size,) * 2 if cfg.image_size else tuple(load_images(train[:1]).shape[-2:]))
    captions = corpus(model, train, mix)  # field -> one caption per record
    val_captions = model.check_texts(val, "caption")
    if val_scenes is not None:  # the probe also draws from the short captions
        model.check_texts(val, "short_caption")
    trained = model.decoder_modules()
    broadcast_from_master([p for m in trained for p in m.parameters()])  # one model on every rank (per-rank seeds drew the random inits)
    if cfg.grad_checkpointing:
        model.transformer.enable_gradient_checkpointing()
    if cfg.fsdp:
        shard(trained, rt.dtype)
    params = [p for m in trained for p in m.parameters()]
    ema = new_ema(params)
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99), weight_decay=cfg.weight_decay)
    step = 0
    if state is not None:  # whole tensors in the checkpoint; this rank's shards of them under FSDP
        with torch.no_grad():
            for p, e, raw, smooth in zip(params, ema, state["raw"], state["ema"]):
                p.copy_(like_param(raw, p))
                e.copy_(like_param(smooth, e))
        load_optimizer_state(opt, trained if cfg.fsdp else [], state["optimizer"])
        step = state["step"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    rt.print(f"decoder: projector {sum(p.numel() for p in model.projector.parameters()) / 1e6:.2f}M + "
             f"DiT {sum(p.numel() for p in model.transformer.parameters()) / 1e6:.2f}M trainable parameters")
    # ---- features
    fields, weights = list(mix), torch.tensor(list(mix.values()))
    size = cfg.image_size or None  # None: as stored
    t0 = time.time()
    if cfg.cache_features:  # the LLM and VAE are frozen: their outputs are fixed, compute them once
        latents = latents_of(model, rt, load_images(train, size))
        hidden = torch.stack([text_features(model, rt, captions[f]) for f in fields])  # (fields, N, T, h)
        rt.print(f"cached {tuple(latents.shape)} latents and {tuple(hidden.shape)} text states in {time.time() - t0:.0f}s")
    if cfg.new_decoder or cfg.init_from == "pretrained":  # a fresh projector: standardise what it reads
        sample = hidden[:, :2000].flatten(0, 1) if cfg.cache_features else \
            text_features(model, rt, [captions[f][i] for f in fields for i in range(min(2000, len(train)))])
        set_text_stats(model, rt, sample)
    empty = text_features(model, rt, [""])
    val_latents = latents_of(model, rt, load_images(val, size)).to(rt.device)
    val_hidden = text_features(model, rt, val_captions).to(rt.device)
    # one fixed batch shape, so one compilation; sampling and probes run the plain modules
    loss_fn = torch.compile(flow_matching_loss) if cfg.compile else flow_matching_loss
    eval_gen = torch.Generator(device=rt.device)
    # ---- loop
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="pretrain_decoder")
    t_log, guard = time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(train), (local_batch,))
        style = torch.multinomial(weights, local_batch, replacement=True)  # which caption of each image
        if cfg.cache_features:
            x0, h = latents[idx].to(rt.device), hidden[style, idx].to(rt.device)
        else:
            with torch.no_grad(), rt.autocast():
                x0 = model.encode_images(load_images([train[i] for i in idx.tolist()], size))  # paper scale: never all in memory
                h = model.text_hidden_states([captions[fields[k]][i] for k, i in zip(style.tolist(), idx.tolist())])
        drop = torch.rand(local_batch) < cfg.cond_dropout
        h = torch.where(drop.view(-1, 1, 1).to(rt.device), empty.to(rt.device, h.dtype), h)
        sigma = torch.sigmoid(cfg.timestep_mean + torch.randn(local_batch, device=rt.device))  # logit-normal timesteps
        shift = model.scheduler.config.shift  # the same resolution shift the sampler's schedule uses
        sigma = shift * sigma / (1 + (shift - 1) * sigma)
        noise = torch.randn_like(x0)
        opt.zero_grad(set_to_none=True)
        losses = []
        for part in micro_slices(local_batch, cfg.micro_batch):  # each chunk's loss weighted by its share: the batch's mean gradient
            with rt.autocast(training=True):
                loss = loss_fn(model, x0[part], h[part], sigma[part], noise[part], cfg.loss_space) * len(x0[part]) / local_batch
            with rt.attention_kernel(training=True):  # grad_checkpointing recomputes blocks in here
                loss.backward()
            losses.append(loss.detach())
        loss = torch.stack(losses).sum()
        if not guard.passed(all_finite(loss), step + 1):
            continue
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        update_ema(params, ema, cfg.ema_decay)
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0:
            loss_avg = all_reduce_mean(loss.detach()).item()
            dt, t_log = (time.time() - t_log) / cfg.log_interval, time.time()
            rt.print(f"step {step} loss {loss_avg:.4f} lr {lr:.2e} step_time {dt * 1000:.0f}ms elapsed {time.time() - t0:.0f}s")
        last = step == cfg.max_steps
        probing = (rt.master or cfg.fsdp) and (step % cfg.eval_interval == 0 or last)  # sharded: every rank takes part
        saving = step % cfg.save_interval == 0 or last
        if probing or saving:
            with ema_weights(params, ema) as raw:
                if probing:
                    model.eval()
                    eval_gen.manual_seed(cfg.seed)
                    report = probe(model, rt, val, val_scenes, cfg, eval_gen) if val_scenes else {}
                    report["text_reliance"] = M.text_reliance(model, rt, val_latents, val_hidden, eval_gen)["text_reliance"]
                    rt.print(f"eval step {step} " + shapes.format_report(report))
                    model.train()
                    if cfg.fsdp:
                        reshard(trained)
                if saving:  # every rank: the RNG states are gathered
                    trained_parts = ("transformer",) + (("scheduler",) if cfg.new_decoder else ()) + \
                                    (("vae",) if cfg.new_decoder and cfg.vae_dir else ())
                    save_checkpoint(cfg.out_dir, model, trained_parts, opt, step, vars(cfg),
                                    {"raw": [full_tensor(r) for r in raw], "ema": [full_tensor(e) for e in ema]},
                                    sharded=trained if cfg.fsdp else ())
    bar.close()
    end_run(rt, step, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
