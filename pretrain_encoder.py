"""Stage 1 (shapes scale): captioning SFT of the Qwen2.5-VL encoder on the world's SHORT captions.

The result is the base captioner: like a VLM pretrained on web alt-text, it names the big things and
mostly omits small ones (DESIGN §4.1, §6). At the paper scale the VLM is already pretrained and this
stage is optional (init_from=<UAE checkpoint from UAE.from_pretrained> runs it as plain SFT).

    python pretrain_encoder.py
    torchrun --standalone --nproc_per_node=2 pretrain_encoder.py --batch_size=64

Loss: cross-entropy on the caption tokens only (and the closing <|im_end|>), image and prompt masked.
Writes out_dir/ (a complete UAE checkpoint: the tiny DiT is still untrained) with training state.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import model as M
import shapes
from captioner import caption_loss
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, checkpoint_rule, end_run, folder_rule, lr_at,
    NonFiniteGuard, RESUME_REMEDY, RULES, save_checkpoint, set_rng_state, start_run)
from configurator import at_least, between, configure, must, only_if
from data import DataError, load_images, read_jsonl

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    caption_field="short_caption",  # which caption to imitate: the world's under-describing alt-text
    grounding=0.5,  # share of examples that ask about one object instead (shapes.object_question; needs "scene"; val: RL gap closed 76% vs 47%, RESULTS.md)
    out_dir="out/pretrain_encoder",  # checkpoint directory
    init_from="scratch",  # "scratch" builds the tiny model; otherwise a UAE checkpoint directory
    tokenizer_dir="data/shapes/tokenizer",  # the world's tokenizer (scratch only)
    vae_dir="data/shapes/vae",  # the world's VAE (scratch only; sizes the DiT)
    resume=True,  # continue from out_dir if it holds an unfinished run
    # model size (scratch only)
    llm_hidden=128,  # LLM width
    llm_layers=3,  # LLM depth
    llm_heads=4,  # attention heads (head dim 32)
    vision_hidden=128,  # ViT width
    vision_layers=3,  # ViT depth
    # optimisation
    max_steps=4000,  # optimizer steps (with grounding: val position accuracy 0.30 at 1,500, 0.85 at 4,000)
    batch_size=64,  # global batch (split over ranks)
    lr=1e-3,  # AdamW peak learning rate (2e-3 measured: the caption collapses to one prior sentence for ~1000 steps, seed-dependent)
    warmup=100,  # linear warmup steps
    weight_decay=0.05,  # AdamW weight decay on matrices
    grad_clip=1.0,  # max gradient norm
    # evaluation / logging
    eval_interval=500,  # steps between val probes (greedy captions, oracle metrics)
    eval_n=200,  # val images per probe
    log_interval=50,  # steps between log lines
    save_interval=500,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    max_new_tokens=48,  # caption length cap when probing
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
scratch = lambda cfg: cfg.init_from == "scratch"
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    caption_field=must(lambda v, c: v.strip(), "a JSONL field name"),
    grounding=between(0.0, 1.0, "a share of the examples"),
    init_from=checkpoint_rule("scratch"),
    tokenizer_dir=only_if(scratch, folder_rule("tokenizer.json")),
    vae_dir=only_if(scratch, folder_rule("config.json")),
    llm_hidden=must(lambda v, c: v % (16 * c.llm_heads) == 0 and v > 0, "a multiple of 16 x llm_heads (M-RoPE cuts a head into 16ths)"),
    llm_layers=at_least(1),
    llm_heads=must(lambda v, c: v >= 2 and v % 2 == 0, "even and >= 2 (two key/value heads serve them)"),
    vision_hidden=must(lambda v, c: v >= 8 and v % max(1, v // 32) == 0 and v // max(1, v // 32) % 4 == 0,
                       "whole heads (vision_hidden // 32 of them, at least 1) of a multiple of 4 (2-D rotary)"),
    vision_layers=at_least(1),
)


def build_processor(tokenizer_dir: str):
    """The Qwen2.5-VL processor with the world's tokenizer: 48x48 images -> 6x6 patches of 8 px,
    merged 2x2 -> 9 image tokens, one per grid cell."""
    from transformers import PreTrainedTokenizerFast, Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        raise FileNotFoundError(f"{tokenizer_dir}/tokenizer.json missing: run python data/shapes/prepare.py")
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=shapes.CANVAS ** 2, max_pixels=shapes.CANVAS ** 2)
    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes),
                               video_processor=Qwen2VLVideoProcessor(**sizes),
                               tokenizer=PreTrainedTokenizerFast.from_pretrained(tokenizer_dir),
                               chat_template=shapes.CHAT_TEMPLATE)


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_batch = rt.per_rank(cfg.batch_size, "batch_size")
    # ---- data (every line checked before any model is built)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"))
    val = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    train_scenes = shapes.scenes_of(train)
    if cfg.grounding > 0 and train_scenes is None:
        raise DataError(f"grounding={cfg.grounding} needs a \"scene\" on every line of {cfg.data_dir}/train.jsonl (shapes world); use --grounding=0")
    val_scenes = shapes.scenes_of(val)
    # ---- model
    if state is not None:
        model = M.UAE.load(cfg.out_dir, remedy=RESUME_REMEDY)
    elif cfg.init_from == "scratch":
        from diffusers import AutoencoderKL
        model = M.UAE.build_tiny(build_processor(cfg.tokenizer_dir), AutoencoderKL.from_pretrained(cfg.vae_dir),
                                 llm_hidden=cfg.llm_hidden, llm_layers=cfg.llm_layers, llm_heads=cfg.llm_heads,
                                 vision_hidden=cfg.vision_hidden, vision_layers=cfg.vision_layers,
                                 caption_prompt=shapes.CAPTION_PROMPT)
    else:
        model = M.UAE.load(cfg.init_from)
    model.to(rt.device).train()
    params = list(model.llm.parameters())
    n_params = sum(p.numel() for p in params)
    rt.print(f"encoder: {n_params / 1e6:.2f}M trainable parameters (Qwen2.5-VL architecture)")
    matrices = [p for p in params if p.ndim >= 2]
    vectors = [p for p in params if p.ndim < 2]
    broadcast_from_master(params)  # one model on every rank (per-rank seeds drew the random inits)
    opt = torch.optim.AdamW([{"params": matrices, "weight_decay": cfg.weight_decay},
                             {"params": vectors, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first probe
    targets = model.check_texts(train, cfg.caption_field, window=False)  # present, and no word the tokenizer lacks
    # ---- images
    train_images = load_images(train)
    val_images = load_images(val)
    # ---- loop
    t0, t_log, guard = time.time(), time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="pretrain_encoder")
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = caption_loss(model, rt, train_images, targets, train_scenes, local_batch, cfg.grounding)
        if not guard.passed(all_finite(loss), step + 1):
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        all_reduce_grads(params)
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        step += 1
        bar.update(1)
        if step % cfg.log_interval == 0:
            loss_avg = all_reduce_mean(loss.detach()).item()
            dt, t_log = (time.time() - t_log) / cfg.log_interval, time.time()
            rt.print(f"step {step} loss {loss_avg:.4f} lr {lr:.2e} step_time {dt * 1000:.0f}ms "
                     f"elapsed {time.time() - t0:.0f}s")
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            if rt.master and val_scenes is not None:
                shapes.probe_captioner(model, rt, val_images, val_scenes, cfg.max_new_tokens, step, batch_size=64)
                if cfg.grounding > 0:
                    shapes.probe_grounding(model, rt, val_images, val_scenes, step)
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, model, M.UAE.PARTS, opt, step, vars(cfg))
    bar.close()
    end_run(rt, step, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
