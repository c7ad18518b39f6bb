"""Where does the decoder fail when it draws the true complete captions, and what does decoder RL's
training sampler see? Two measurements on the first `n` val scenes (RESULTS.md, issue 23):

    python tools/decoder_diag.py --ckpts=out/dec,out/gd --seeds=4            # drawings as eval_unified makes them
    python tools/decoder_diag.py --ckpts=out/dec --mode=credit --noise_level=0.7

- mode=draw: `seeds` drawings per caption (Euler, `steps`, CFG): the exact-scene rate (GenEval-shapes
  overall) per seed and by object count, the captions drawn right never / sometimes / always, and the
  kinds of error (an object missing, an extra one, a wrong position or size of an object drawn).
- mode=credit: grpo_decoder's training sampler (`steps` SDE steps at `noise_level`): for `latents` initial
  latents per caption, `seeds` SDE noise draws each. The share of the outcome variance that the SDE noise
  alone explains (the initial latent fixed) is the share GRPO's log-probs can credit. Headline: at
  8 steps and level 0.7 the sampler draws 0.565 exactly (0.888 at 30 ODE steps) and the SDE noise
  explains 84% of the variance.
"""
import collections
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import shapes  # noqa: E402
from common import RULES, setup_runtime  # noqa: E402
from configurator import above, at_least, configure, must, one_of, only_if  # noqa: E402
from data import read_jsonl  # noqa: E402

config = dict(
    ckpts="out/grpo_decoder",  # checkpoints, separated by commas
    data="data/shapes/val.jsonl",  # scenes with their true complete captions (val: this is a diagnosis)
    n=300,  # scenes (the first n)
    mode="draw",  # draw (as eval_unified) or credit (grpo_decoder's SDE sampler)
    seeds=4,  # drawings per caption (draw) or SDE noise draws per initial latent (credit)
    latents=3,  # initial latents per caption (credit)
    steps=30,  # sampling steps (draw: Euler, as eval_unified's 30; credit: SDE, grpo_decoder's train_steps is 8)
    noise_level=0.7,  # SDE noise level (credit)
    cfg_scale=1.25,  # classifier-free guidance
    batch_size=50,  # images per forward (draw)
    compile=True,  # torch.compile the DiT (draw)
    threads=0,  # torch threads (0 = default)
)
rules = {k: RULES[k] for k in ("cfg_scale", "threads")} | dict(  # valid values beyond the types, checked first
    ckpts=must(lambda v, c: all(os.path.isfile(os.path.join(p, "model.json")) for p in v.split(",")),
               "comma-separated UAE checkpoint directories (each with model.json)"),
    data=must(lambda v, c: os.path.isfile(v), "a JSONL file"),
    n=at_least(1),
    mode=one_of("draw", "credit"),
    seeds=at_least(1),
    latents=at_least(1),
    steps=at_least(2),
    noise_level=only_if(lambda cfg: cfg.mode == "credit", above(0.0, "credit needs SDE noise")),
    batch_size=at_least(1),
)


def errors(drawn: tuple, scene: tuple) -> collections.Counter:
    """Objects (colour, shape) missing or extra, and wrong positions / sizes of the objects drawn."""
    d, t = {(o.color, o.shape): o for o in drawn}, {(o.color, o.shape): o for o in scene}
    both = t.keys() & d.keys()
    return collections.Counter(missing=len(t.keys() - d.keys()), extra=len(d.keys() - t.keys()),
                               wrong_pos=sum(t[k].pos != d[k].pos for k in both),
                               wrong_size=sum(t[k].size != d[k].size for k in both))


def draw(model, rt, captions, scenes, cfg) -> dict:
    ok, kinds = np.zeros((cfg.seeds, len(captions)), bool), collections.Counter()
    generator = torch.Generator(device=rt.device).manual_seed(0)
    for k in range(cfg.seeds):
        with torch.no_grad(), rt.autocast():
            images = model.generate(captions, cfg.steps, cfg.cfg_scale, generator=generator, batch_size=cfg.batch_size)
        for i, (image, scene) in enumerate(zip(images, scenes)):
            drawn = shapes.detect_scene(image)
            ok[k, i] = drawn == scene
            kinds += errors(drawn, scene) if not ok[k, i] else collections.Counter()
    n_obj, p = np.array([len(s) for s in scenes]), ok.mean(0)
    print(f"exact {ok.mean():.3f}; per seed {' '.join(f'{v:.3f}' for v in ok.mean(1))}; by objects "
          + " ".join(f"{n}: {ok[:, n_obj == n].mean():.3f}" for n in sorted(set(n_obj)))
          + f"; captions never / sometimes / always right {(p == 0).mean():.3f} / {((p > 0) & (p < 1)).mean():.3f} / "
          f"{(p == 1).mean():.3f}; errors {dict(kinds)}")
    return {"exact": float(ok.mean()), "per_seed": ok.mean(1).tolist(), "errors": dict(kinds)}


def variance_split(ok: np.ndarray) -> tuple[float, float]:
    """ok: (initial latents, SDE draws, captions) outcomes. Per caption, the outcome variance over all its
    drawings and the mean variance over SDE draws with the initial latent fixed; each averaged over captions."""
    return float(ok.var(axis=(0, 1)).mean()), float(ok.var(axis=1).mean())


def credit(model, rt, captions, scenes, cfg) -> dict:
    ok = np.zeros((cfg.latents, cfg.seeds, len(captions)), bool)
    generator = torch.Generator(device=rt.device).manual_seed(0)
    with torch.no_grad(), rt.autocast():
        cond, negative = model.condition(captions), model.negative_condition(len(captions))
        for r in range(cfg.latents):
            x_t = torch.randn(model.latent_shape(len(captions)), generator=generator, device=rt.device)
            for k in range(cfg.seeds):
                out = model.sample_sde(cond, cfg.steps, cfg.cfg_scale, negative, cfg.noise_level, generator=generator, noise=x_t)
                images = model.decode_latents(out["latents"][:, -1])
                ok[r, k] = [shapes.detect_scene(i) == s for i, s in zip(images, scenes)]
    total, within = variance_split(ok)
    rate = ok.mean(1)
    print(f"exact {ok.mean():.3f} ({cfg.steps} SDE steps, level {cfg.noise_level}); outcome variance {total:.4f}, of which "
          f"the SDE noise alone {within:.4f} ({within / max(total, 1e-12):.2f}); latent-caption pairs whose outcome the "
          f"SDE noise changes {((rate > 0) & (rate < 1)).mean():.3f}")
    return {"exact": float(ok.mean()), "variance": float(total), "sde_variance": float(within)}


def main(argv=None) -> dict:
    cfg = configure(config, argv, rules)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = setup_runtime("auto", "auto", 0)
    records = read_jsonl(cfg.data)[:cfg.n]
    captions, scenes = [r["caption"] for r in records], shapes.scenes_of(records)
    results = {}
    for ckpt in cfg.ckpts.split(","):
        model = M.UAE.load(ckpt, dtype=torch.float32).to(rt.device).eval()
        if cfg.mode == "draw" and cfg.compile:
            model.compile_decoder()
        print(f"{ckpt}: ", end="")
        results[ckpt] = (draw if cfg.mode == "draw" else credit)(model, rt, captions, scenes, cfg)
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
