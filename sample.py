"""Look at a UAE checkpoint: I2T (caption images), T2I (images from text), I2I (reconstruct an
image through its own caption: the auto-encoder round trip, DESIGN §1).

    python sample.py --ckpt=out/pretrain_decoder --mode=i2i --n=8
    python sample.py --ckpt=out/pretrain_decoder --mode=t2i --prompt="a large red circle at the center."
    python sample.py --ckpt=out/pretrain_encoder --mode=i2t --data=data/shapes/val.jsonl

Writes PNGs and grid.png (source | caption | reconstruction) into out_dir, prints the captions.
"""
import os
import sys

import torch
from PIL import Image

import model as M
from common import checkpoint_rule, RULES, setup_runtime
from configurator import at_least, configure, must, one_of, only_if
from data import load_images, read_jsonl, save_grid, to_uint8_hwc

config = dict(
    ckpt="out/pretrain_decoder",  # UAE checkpoint directory
    mode="i2i",  # i2t | t2i | i2i
    data="data/shapes/bench.jsonl",  # images for i2t / i2i (first n lines)
    prompt="",  # t2i text; empty = the first n captions of `data`
    n=8,  # how many examples
    out_dir="out/samples",  # where PNGs go
    greedy=False,  # greedy captions instead of sampling
    temperature=0.7,  # caption sampling temperature (the paper's)
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    sample_steps=30,  # Euler steps of the decoder
    cfg_scale=1.25,  # classifier-free guidance scale (shapes world: best of 1-3, README "guidance")
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float16
    seed=0,  # sampling seed
)
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    ckpt=checkpoint_rule(),
    mode=one_of("i2t", "t2i", "i2i"),
    data=only_if(lambda cfg: cfg.mode != "t2i" or not cfg.prompt, must(lambda v, c: os.path.isfile(v), "a JSONL file")),
    n=at_least(1),
)


@torch.no_grad()
def main(argv=None):
    cfg = configure(config, argv, rules)
    records = [] if cfg.mode == "t2i" and cfg.prompt else read_jsonl(cfg.data, need_caption=cfg.mode == "t2i")[:cfg.n]
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    model = M.UAE.load(cfg.ckpt).to(rt.device).eval()
    model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first caption
    os.makedirs(cfg.out_dir, exist_ok=True)
    generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
    if cfg.mode == "t2i":  # a word the tokenizer does not know, or a text longer than the window, is named before drawing
        texts = [cfg.prompt] * cfg.n if cfg.prompt else model.check_texts(records, "caption")
        with rt.autocast():
            images = model.generate(texts, cfg.sample_steps, cfg.cfg_scale, generator=generator)
        rows = [(text, image) for text, image in zip(texts, images)]
    else:
        sources = load_images(records)
        with rt.autocast():
            texts = model.describe(sources, cfg.temperature, cfg.max_new_tokens, cfg.greedy)
        rows = [(src, text) for src, text in zip(sources, texts)]
        if cfg.mode == "i2i":
            with rt.autocast():
                images = model.generate(texts, cfg.sample_steps, cfg.cfg_scale, generator=generator, allow_cut=True)
            rows = [row + (image,) for row, image in zip(rows, images)]
            if model.turns_cut:
                print(f"{model.turns_cut} caption(s) re-encoded longer than the decoder's window: cut to it")
            if model.unknown_word_captions:
                print(f"warning: {model.unknown_word_captions} caption(s) with words the tokenizer does not know: read as "
                      f"{model.tokenizer.unk_token}")
    for i, row in enumerate(rows):
        print(f"{i}: {next(c for c in row if isinstance(c, str))}")
        for j, cell in enumerate(c for c in row if not isinstance(c, str)):
            Image.fromarray(to_uint8_hwc(cell)).save(os.path.join(cfg.out_dir, f"{i:03d}_{j}.png"))
    save_grid(rows, os.path.join(cfg.out_dir, "grid.png"))
    print(f"wrote {len(rows)} examples and grid.png to {cfg.out_dir}")


if __name__ == "__main__":
    main(sys.argv[1:])
