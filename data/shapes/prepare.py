"""Generate the shapes world (train / val / bench splits), its tokenizer, and its reward CLIP.

    python data/shapes/prepare.py                                # ~4 minutes on 2 CPU cores
    python data/shapes/prepare.py --n_train=2000 --clip_steps=30   # a quick look

Writes into this folder:
    {train,val,bench}.jsonl   {"image", "caption" (long), "short_caption", "scene"} per line
    images/{split}/NNNNNN.png 48x48 RGB renders
    tokenizer/                the world's word-level tokenizer (Qwen2.5-VL special tokens + chat template)
    shapes_clip.pt            the reward backbone: a small open_clip "ShapesCLIP" (config/open_clip/)
                              trained contrastively on (image, long caption), loaded by reward.py as
                              "open_clip:ShapesCLIP:data/shapes/shapes_clip.pt", exactly like a real CLIP
    shapes_clip_eval.json     its retrieval, small-object and position sensitivity on val

Deterministic for a given seed (the CLIP up to floating-point non-determinism of threaded kernels).
"""
import dataclasses
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)  # this script lives in data/shapes/; the world's code is at the top level
import shapes  # noqa: E402
from configurator import configure  # noqa: E402
from data import write_json  # noqa: E402

config = dict(
    out_dir=os.path.dirname(os.path.abspath(__file__)),  # where splits, tokenizer and CLIP go
    seed=1337,  # every split and the CLIP derive their randomness from this
    n_train=20000,  # training scenes (1-4 objects)
    n_val=2000,  # validation scenes
    n_bench=100,  # the fixed Unified-Bench analog
    clip_steps=300,  # CLIP optimizer steps (~3 minutes on 2 cores)
    clip_batch=96,  # scenes per CLIP step; each adds 5 hard negatives and a re-jittered copy (7x images)
    clip_lr=2e-3,  # AdamW peak learning rate (linear warmup, cosine decay over the time budget)
    clip_warmup=100,  # warmup steps
    clip_weight_decay=0.1,  # AdamW weight decay
    clip_eval_n=1000,  # val pairs for the retrieval check
    threads=0,  # torch threads (0 = torch's default)
)


def write_split(name: str, n: int, seed: int, out_dir: str) -> list[tuple]:
    rng = random.Random(seed)
    os.makedirs(os.path.join(out_dir, "images", name), exist_ok=True)
    scenes, lines = [], []
    for i in range(n):
        scene = shapes.sample_scene(rng)
        image = f"images/{name}/{i:06d}.png"
        Image.fromarray(shapes.render(scene)).save(os.path.join(out_dir, image), compress_level=1)
        lines.append(json.dumps({"image": image, "caption": shapes.long_caption(scene),
                                 "short_caption": shapes.short_caption(scene, rng),
                                 "scene": [o.to_json() for o in scene]}))
        scenes.append(scene)
    tmp = os.path.join(out_dir, f"{name}.jsonl.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, os.path.join(out_dir, f"{name}.jsonl"))  # the jsonl appears only when complete
    return scenes


def images_tensor(scenes) -> torch.Tensor:
    return torch.from_numpy(np.stack([shapes.render(s) for s in scenes])).permute(0, 3, 1, 2).contiguous()


HARD_NEGATIVES = ("drop", "move", "recolor", "reshape", "resize")  # one edit of one object each


def edit_one(scene: tuple, rng: random.Random, edit: str) -> tuple:
    """The scene with one object changed in one way (a hard negative that differs only there): dropped
    (preferring a small one), moved to an empty cell, or given another colour / shape / size. Colour
    and shape edits keep (colour, shape) pairs distinct, as sample_scene does; where none is free,
    and for dropping the only object, the size flips instead."""
    if edit == "drop" and len(scene) > 1:
        victim = rng.choice([o for o in scene if o.size == "small"] or list(scene))
        return tuple(o for o in scene if o is not victim)
    victim = rng.choice(scene)
    rest = [o for o in scene if o is not victim]
    taken, occupied = {(o.color, o.shape) for o in rest}, {o.pos for o in scene}
    options = {"move": [dict(pos=p) for p in shapes.POSITIONS if p not in occupied],
               "recolor": [dict(color=c) for c in shapes.COLORS if c != victim.color and (c, victim.shape) not in taken],
               "reshape": [dict(shape=k) for k in shapes.SHAPES if k != victim.shape and (victim.color, k) not in taken]}
    choices = options.get(edit) or [dict(size="small" if victim.size == "large" else "large")]
    return shapes.canonical(rest + [dataclasses.replace(victim, **rng.choice(choices))])


def train_clip(cfg, train_scenes, val_scenes) -> dict:
    import open_clip
    open_clip.add_model_config(os.path.join(REPO, "config", "open_clip"))
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model = open_clip.create_model("ShapesCLIP")
    tokenizer = open_clip.get_tokenizer("ShapesCLIP")
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    prep = lambda u8: (u8.float() / 255 - mean) / std

    # Each train scene comes with one hard negative per HARD_NEGATIVES edit, re-jittered, and a positive:
    # the scene re-jittered. Text-image contrast over scenes + negatives teaches the features to notice
    # a missing (small) object, a wrong position, colour, shape or size; image-image contrast of a scene
    # against its re-jittered copy and the negatives teaches them to ignore jitter (DESIGN §6). With the
    # drop negative alone the reward was nearly blind to layout: moving an object cost 0.020 cosine,
    # re-jittering 0.011, dropping one 0.40.
    groups = [train_scenes] + [[shapes.rejitter(edit_one(s, rng, e), rng) for s in train_scenes] for e in HARD_NEGATIVES]
    jittered = [shapes.rejitter(s, rng) for s in train_scenes]
    images = torch.cat([images_tensor(g) for g in groups + [jittered]])
    texts = tokenizer([shapes.long_caption(s) for g in groups for s in g])
    n = len(train_scenes)

    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.clip_weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.clip_lr, betas=(0.9, 0.98))
    model.train()
    t0, step, losses = time.time(), 0, []
    while step < cfg.clip_steps:
        lr = cfg.clip_lr * min(1.0, (step + 1) / cfg.clip_warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.clip_steps))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, n, (cfg.clip_batch,))
        pairs = torch.cat([idx + k * n for k in range(len(groups))])  # each scene and its hard negatives
        with torch.autocast("cpu", dtype=torch.bfloat16):
            img_f, txt_f, scale = model(prep(images[torch.cat([pairs, idx + len(groups) * n])]), texts[pairs])
        img_f, txt_f = img_f.float(), txt_f.float()
        pair_img, jitter_img = img_f[:len(pairs)], img_f[len(pairs):]
        logits = scale * pair_img @ txt_f.T
        labels = torch.arange(len(pairs))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        # image-image: each re-jittered copy must pick its scene among all scenes and hard negatives
        loss = loss + F.cross_entropy(scale * jitter_img @ pair_img.T, torch.arange(len(idx)))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"clip step {step} loss {loss.item():.4f} lr {lr:.2e} t {time.time() - t0:.0f}s", flush=True)
        step += 1
    train_seconds = time.time() - t0
    model.eval()
    path = os.path.join(cfg.out_dir, "shapes_clip.pt")
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return {"steps": step, "train_seconds": round(train_seconds, 1), "final_loss": float(np.mean(losses[-20:])),
            **evaluate_clip(model, tokenizer, prep, val_scenes[:cfg.clip_eval_n], cfg.seed)}


@torch.no_grad()
def evaluate_clip(model, tokenizer, prep, scenes, seed) -> dict:
    """Image->text R@1 among the val pairs; small-object sensitivity: for scenes with a small object,
    is the image closer to a re-jittered render of itself than to itself minus that object?; and
    position sensitivity, the same with one object moved instead of removed (cosines reported too)."""
    rng = random.Random(seed + 7)
    embed = lambda sc: F.normalize(model.encode_image(prep(images_tensor(sc))).float(), dim=-1)
    img = embed(scenes)
    txt = F.normalize(model.encode_text(tokenizer([shapes.long_caption(s) for s in scenes])).float(), dim=-1)
    r1 = (img @ txt.T).argmax(1).eq(torch.arange(len(scenes))).float().mean().item()
    cos = lambda a, b: (a * b).sum(-1)
    jittered = cos(img, embed([shapes.rejitter(s, rng) for s in scenes]))
    moved = cos(img, embed([edit_one(s, rng, "move") for s in scenes]))
    has_small = torch.tensor([any(o.size == "small" for o in s) for s in scenes])
    with_small = [s for s, keep in zip(scenes, has_small) if keep]
    removed = cos(img[has_small], embed([edit_one(s, rng, "drop") for s in with_small]))
    return {"val_pairs": len(scenes), "i2t_r1": r1, "small_object_scenes": len(with_small),
            "small_object_sensitivity": (jittered[has_small] > removed).float().mean().item(),
            "position_sensitivity": (jittered > moved).float().mean().item(),
            "cosine_rejittered": jittered.mean().item(), "cosine_moved": moved.mean().item()}


def main(argv=None):
    cfg = configure(config, argv)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    os.makedirs(cfg.out_dir, exist_ok=True)
    t0 = time.time()
    splits = {}
    for i, (name, n) in enumerate((("train", cfg.n_train), ("val", cfg.n_val), ("bench", cfg.n_bench))):
        splits[name] = write_split(name, n, cfg.seed * 1000 + i, cfg.out_dir)
        print(f"wrote {n} {name} scenes ({time.time() - t0:.0f}s)", flush=True)
    shapes.build_tokenizer().save_pretrained(os.path.join(cfg.out_dir, "tokenizer"))
    report = train_clip(cfg, splits["train"], splits["val"])
    report["total_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(cfg.out_dir, "shapes_clip_eval.json"), report)  # last: the speedrun's "done" mark
    print("shapes clip: " + " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
