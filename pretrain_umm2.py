"""UMM-2 stage 1 (shapes scale): one network learns to describe and to draw, the analog of Janus-Pro's pretraining.

The UMM-2 (umm2.py: Janus, one LLaMA LLM for both directions) is built around pretrain_vq.py's frozen
tokenizer and trained on mixed batches: I2T cross-entropy on the world's SHORT captions (plus grounding
questions: captioner.caption_loss), so its captions under-describe like the UMM-1 base encoder's, and
T2I cross-entropy on the VQ tokens of the images, given captions from pretrain_decoder's corpus mix (complete,
partial and short captions), so what a caption leaves out is its guess. Janus-Pro's pretraining mixes the
same two tasks (with text-only data) in one batch (Chen et al. 2025, §2.2). A T2I caption is dropped with
probability cond_dropout: Janus's unconditional prompt (every token but bos and <begin_of_image> replaced by
pad, UMM2.unconditional), the branch classifier-free guidance reads.

    python pretrain_umm2.py --vq_dir=out/pretrain_vq
    torchrun --standalone --nproc_per_node=2 pretrain_umm2.py

Measured (a 6.5-minute trial, 1 thread, on a 2,000-step tokenizer that reads 54% of val scenes exactly; not
a plateau): 0.26-0.34 s per step of 64; at step 25 / 400 / 1,400 the I2T loss 2.60 / 0.59 / 0.48, the T2I loss
6.90 / 4.66 / 2.96 (ln 1024 = 6.93); GenEval-shapes still 0 at step 1,250 (count 0.37), caption precision 0.43.

Writes out_dir/ (a UMM2 checkpoint: the whole Janus, tokenizer included, and its processor) with training
state. Probes: caption precision / recall / small-object recall of greedy captions (shapes.caption_report)
and GenEval-shapes of images drawn with guidance from the true complete captions.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import shapes
import umm2
from captioner import caption_loss
from common import (
    all_finite, all_reduce_grads, all_reduce_mean, broadcast_from_master, checkpoint_rule, end_run, folder_rule, lr_at,
    NonFiniteGuard, RESUME_REMEDY, RULES, save_checkpoint, set_rng_state, start_run)
from configurator import at_least, between, configure, must, only_if, parses
from data import caption_mix, DataError, load_images, read_jsonl

config = dict(
    data_dir="data/shapes",  # folder with train.jsonl / val.jsonl (DESIGN §5)
    vq_dir="out/pretrain_vq",  # with init_from="scratch": pretrain_vq.py's out_dir, the tokenizer the model draws with
    init_from="scratch",  # "scratch" builds the tiny UMM-2 around vq_dir's tokenizer; otherwise a UMM2 checkpoint directory
    out_dir="out/pretrain_umm2",  # checkpoint directory
    resume=True,  # continue from out_dir if it holds an unfinished run
    # the two tasks
    caption_field="short_caption",  # I2T targets: the world's under-describing alt-text (the base encoder's)
    grounding=0.5,  # share of I2T examples that ask about one object instead (shapes.object_question, as pretrain_encoder)
    captions="caption:0.4,partial_caption:0.35,short_caption:0.25",  # T2I corpus: caption fields and weights (pretrain_decoder's)
    t2i_share=0.5,  # share of each batch that is T2I (the rest I2T)
    cond_dropout=0.1,  # P(T2I caption -> Janus's unconditional prompt) so CFG has an unconditional branch
    # model size (scratch only)
    llm_hidden=128,  # LLM width
    llm_layers=3,  # LLM depth
    llm_heads=4,  # attention heads (head dim 32)
    llm_kv_heads=2,  # key/value heads
    vision_hidden=128,  # vision encoder width (one patch per VQ token: a grid cell)
    vision_layers=3,  # vision encoder depth
    # optimisation
    max_steps=8000,  # optimizer steps
    batch_size=64,  # global batch (split over ranks), both tasks together
    lr=1e-3,  # AdamW peak learning rate
    warmup=100,  # linear warmup steps
    weight_decay=0.05,  # AdamW weight decay on matrices
    grad_clip=1.0,  # max gradient norm
    # evaluation / logging
    eval_interval=1000,  # steps between val probes
    eval_n=200,  # val images / captions per probe
    cfg_scale=5.0,  # guidance when probing T2I (Janus-Pro's default)
    max_new_tokens=48,  # caption length cap (the checkpoint's max_caption_tokens with init_from="scratch")
    log_interval=50,  # steps between log lines
    save_interval=1000,  # steps between checkpoints
    max_bad_steps=3,  # consecutive NaN/Inf steps before the run stops
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float32 (float16 is refused: no loss scaling)
    seed=1337,  # base seed (+ rank)
    threads=0,  # torch CPU threads (0 = default)
)
scratch = lambda cfg: cfg.init_from == "scratch"
per_rank = lambda cfg: cfg.batch_size // int(os.environ.get("WORLD_SIZE", "1"))  # rows of each rank's batch (rt.per_rank)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    vq_dir=only_if(scratch, folder_rule("vq/config.json")),  # pretrain_vq.py's out_dir (umm2.load_vq)
    init_from=checkpoint_rule("scratch", kind="UMM2"),
    caption_field=must(lambda v, c: v.strip(), "a JSONL field name"),
    grounding=between(0.0, 1.0, "a share of the I2T examples"),
    captions=parses(caption_mix),  # field:weight,...
    t2i_share=must(lambda v, c: 0 < round(per_rank(c) * v) < per_rank(c), "in (0, 1), leaving each task at least one row of every rank's batch"),
    cond_dropout=between(0.0, 1.0, "a probability"),
    llm_hidden=must(lambda v, c: v > 0 and v % (2 * c.llm_heads) == 0, "a multiple of 2 x llm_heads (whole heads of even width: rotary)"),
    llm_layers=at_least(1),
    llm_heads=must(lambda v, c: v >= 1 and v % c.llm_kv_heads == 0, "a positive multiple of llm_kv_heads (grouped-query attention)"),
    llm_kv_heads=at_least(1),
    vision_hidden=must(lambda v, c: v >= 1 and v % max(1, v // 32) == 0, "whole heads (vision_hidden // 32 of them, at least 1)"),
    vision_layers=at_least(1),
    max_new_tokens=only_if(scratch, at_least(1, "the caption cap the model is built with")),
)


def build_model(cfg) -> umm2.UMM2:
    """The tiny UMM-2 around vq_dir's tokenizer (its image size and grid set the processor's and the vision
    encoder's), or init_from's UMM2 checkpoint."""
    if cfg.init_from != "scratch":
        return umm2.UMM2.load(cfg.init_from)
    vq = umm2.load_vq(cfg.vq_dir)
    factor = umm2.vq_factor(vq.config)
    processor = umm2.build_processor(shapes.build_tokenizer("janus"), vq.config.num_patches * factor, factor)
    return umm2.UMM2.build_tiny(processor, vq, llm_hidden=cfg.llm_hidden, llm_layers=cfg.llm_layers,
                                llm_heads=cfg.llm_heads, llm_kv_heads=cfg.llm_kv_heads, vision_hidden=cfg.vision_hidden,
                                vision_layers=cfg.vision_layers, max_caption_tokens=cfg.max_new_tokens,
                                caption_prompt=shapes.CAPTION_PROMPT)


@torch.no_grad()
def image_tokens(model, images, batch=250) -> torch.Tensor:
    """The frozen tokenizer's codes of every image, computed once (CPU, int64)."""
    return torch.cat([model.encode_images(images[i:i + batch].to(model.device)).cpu() for i in range(0, len(images), batch)])


def t2i_loss(model, rt, tokens, captions: dict[str, list[str]], weights: torch.Tensor, n: int, cond_dropout: float):
    """Mean cross-entropy of the image tokens of n random examples given one caption of each (a field drawn
    by `weights`), a share cond_dropout of the prompts made unconditional."""
    idx = torch.randint(0, len(tokens), (n,))
    fields = list(captions)
    style = torch.multinomial(weights, n, replacement=True)
    prompt = model.image_prompt([captions[fields[k]][i] for k, i in zip(style.tolist(), idx.tolist())])
    drop = (torch.rand(n) < cond_dropout).to(model.device)
    prompt["input_ids"] = torch.where(drop[:, None], model.unconditional(prompt["input_ids"]), prompt["input_ids"])
    with rt.autocast(training=True):
        return -model.image_logprobs(prompt, tokens[idx].to(model.device), cfg_scale=1.0).mean()


@torch.no_grad()
def probe(model, rt, val, images, scenes, cfg, generator) -> dict:
    """GenEval-shapes of images drawn with guidance from the val scenes' complete captions, and the caption
    report of greedy captions of their images (short_mentioned_recall: does a drawing from a short caption
    hold what it names?)."""
    model.eval()
    with rt.autocast():
        drawn = model.generate([r["caption"] for r in val], cfg.cfg_scale, generator=generator, batch_size=50)
        short = model.generate([r["short_caption"] for r in val], cfg.cfg_scale, generator=generator, batch_size=50)
        texts = model.describe(images, greedy=True, batch_size=50)
    model.train()
    report = {f"gen_{k}": v for k, v in shapes.generation_report(drawn, scenes).items()}
    report["short_mentioned_recall"] = shapes.mentioned_object_recall([r["short_caption"] for r in val], short)
    return report | shapes.caption_report(texts, scenes) | {"example": texts[0]}


def main(argv=None):
    cfg = configure(config, argv, rules)
    rt, state = start_run(cfg)
    if state == "complete":
        return
    local_batch = rt.per_rank(cfg.batch_size, "batch_size")
    n_t2i = round(local_batch * cfg.t2i_share)
    # ---- data (lines and scenes checked before any model is built; caption texts against its tokenizer right after)
    train = read_jsonl(os.path.join(cfg.data_dir, "train.jsonl"))
    val = read_jsonl(os.path.join(cfg.data_dir, "val.jsonl"))[:cfg.eval_n]
    mix = caption_mix(cfg.captions)
    train_scenes = shapes.scenes_of(train)
    if cfg.grounding > 0 and train_scenes is None:
        raise DataError(f"grounding={cfg.grounding} needs a \"scene\" on every line of {cfg.data_dir}/train.jsonl (shapes world); use --grounding=0")
    # ---- model
    model = (umm2.UMM2.load(cfg.out_dir, remedy=RESUME_REMEDY) if state is not None else build_model(cfg)).to(rt.device).train()
    params = [p for p in model.llm.parameters() if p.requires_grad]  # all but the frozen VQ tokenizer
    rt.print(f"umm2: {sum(p.numel() for p in params) / 1e6:.2f}M trainable parameters (Janus architecture), "
             f"{model.image_tokens} image tokens of {model.image_size}-px images")
    targets = model.check_texts(train, cfg.caption_field, window=False)  # present, and no word the tokenizer lacks
    captions = {field: model.check_texts(train, field, window=False) for field in mix}
    broadcast_from_master(params)  # one model on every rank (per-rank seeds drew the random inits)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    step = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        rt.print(f"resumed from {cfg.out_dir} at step {step}")
    # ---- images
    train_images = load_images(train)
    t0 = time.time()
    tokens = image_tokens(model, train_images)
    rt.print(f"cached {tuple(tokens.shape)} image tokens in {time.time() - t0:.0f}s")
    weights = torch.tensor(list(mix.values()))
    val_images, val_scenes = load_images(val), shapes.scenes_of(val)
    eval_gen = torch.Generator(device=rt.device)
    # ---- loop
    t_log, guard = time.time(), NonFiniteGuard(rt, cfg.max_bad_steps, cfg.out_dir)
    if state is not None:  # last: start-up draws random numbers too (set_rng_state)
        set_rng_state(state["rng"])
    bar = tqdm(total=cfg.max_steps, initial=step, disable=not rt.master, desc="pretrain_umm2")
    while step < cfg.max_steps:
        lr = lr_at(step, cfg.max_steps, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        i2t = caption_loss(model, rt, train_images, targets, train_scenes, local_batch - n_t2i, cfg.grounding)
        t2i = t2i_loss(model, rt, tokens, captions, weights, n_t2i, cfg.cond_dropout)
        loss = (1 - cfg.t2i_share) * i2t + cfg.t2i_share * t2i
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
            loss_avg, i2t_avg, t2i_avg = (all_reduce_mean(v.detach()).item() for v in (loss, i2t, t2i))
            dt, t_log = (time.time() - t_log) / cfg.log_interval, time.time()
            rt.print(f"step {step} loss {loss_avg:.4f} i2t {i2t_avg:.4f} t2i {t2i_avg:.4f} lr {lr:.2e} "
                     f"step_time {dt * 1000:.0f}ms elapsed {time.time() - t0:.0f}s")
        if (step % cfg.eval_interval == 0 or step == cfg.max_steps) and rt.master and val_scenes is not None:
            eval_gen.manual_seed(cfg.seed)
            report = probe(model, rt, val, val_images, val_scenes, cfg, eval_gen)
            rt.print(f"eval step {step} " + shapes.format_report(report) + f" | {report['example']}")
        if step % cfg.save_interval == 0 or step == cfg.max_steps:
            save_checkpoint(cfg.out_dir, model, umm2.UMM2.PARTS, opt, step, vars(cfg))
    bar.close()
    end_run(rt, step, t0)


if __name__ == "__main__":
    main(sys.argv[1:])
