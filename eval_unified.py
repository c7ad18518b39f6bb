"""Unified-Bench (Protocol 1): how well does a model reconstruct an image through its own caption?

For every source image the model writes a caption (I2T) and redraws the image from it (T2I); each
configured backbone embeds source and reconstruction, and the cosine of the L2-normalised features
is the image's score. Unified-Score = mean over backbones of the bench average, x 100 (DESIGN §7).

    python eval_unified.py --ckpt=out/grpo_decoder                          # shapes bench
    python eval_unified.py --ckpt=out/x --data=my/bench.jsonl --clip=open_clip:ViT-L-14-quickgelu:/ckpt/ViT-L-14.pt \
        --longclip=open_clip:ViT-L-14-quickgelu:/ckpt/longclip-L.pt --dinov2=hf:/ckpt/dinov2-large --dinov3=hf:/ckpt/dinov3-vitl16
    python eval_unified.py --generated=any_model_outputs/ --references=sources/   # score another model's images

Writes out_dir/: reconstructions/ (PNG), captions.jsonl, grid.png and results.json in the released
scorer's format: {backbone: {"scores": {image: cos}, "average", "min", "max"}, "overall_mean",
"unified_score"}. On the shapes world (records carry "scene") it adds the oracle tables:
understanding (recall, small-object recall, attribute accuracy, precision, caption length),
generation (GenEval-shapes from the TRUE long captions: overall, per category, >=3-object subset),
unification (Unified-Score, scene-F1 of source vs reconstruction).
"""
import json
import os
import sys

import numpy as np
import torch
from PIL import Image

import model as M
import shapes
from configurator import configure
from data import DataError, load_images, read_jsonl, save_grid, to_uint8_hwc, write_json
from reward import cosine, load_backbone

config = dict(
    ckpt="",  # UAE checkpoint to evaluate (empty with --generated: score existing images)
    data="data/shapes/bench.jsonl",  # source images (and, for the shapes world, their scenes)
    generated="",  # folder of reconstructions to score against --references (matched by file name)
    references="",  # folder of source images for --generated
    out_dir="out/eval",  # where reconstructions, captions, grid and results.json go
    clip="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # backbone spec (paper: CLIP ViT-L/14)
    longclip="",  # LongCLIP-L spec, empty = skipped
    dinov2="",  # DINOv2-L spec (hf:<dir>), empty = skipped
    dinov3="",  # DINOv3 ViT-L/16 spec (hf:<dir>), empty = skipped
    greedy=True,  # greedy captions (deterministic); False samples at `temperature`
    temperature=0.7,  # caption sampling temperature when not greedy
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    sample_steps=30,  # Euler steps of the decoder
    cfg_scale=1.25,  # classifier-free guidance scale (shapes world: best of 1-3, README "guidance")
    batch_size=50,  # images per forward
    geneval=True,  # shapes world: also generate from the true long captions (GenEval-shapes)
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float16
    seed=0,  # sampling seed (the same noise for every checkpoint)
)
BACKBONES = ("clip", "longclip", "dinov2", "dinov3")


def score(backbones: dict, sources: torch.Tensor, recons: torch.Tensor, names: list[str]) -> dict:
    """Per backbone: per-image cosine of (source, reconstruction) features, average, min, max."""
    results = {}
    for key, backbone in backbones.items():
        s = cosine(backbone.features(sources.float() / 255), backbone.features(recons.float() / 255)).tolist()
        results[key] = {"spec": backbone.name, "scores": dict(zip(names, s)), "average": float(np.mean(s)),
                        "min": float(np.min(s)), "max": float(np.max(s))}
    overall = float(np.mean([r["average"] for r in results.values()]))
    return {**results, "overall_mean": overall, "unified_score": 100 * overall}


def load_folder_pairs(generated: str, references: str) -> tuple:
    """Reconstructions matched to references by file name; a missing one is an error naming it."""
    names = sorted(f for f in os.listdir(references) if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    if not names:
        raise DataError(f"{references}: no images")
    missing = [n for n in names if not os.path.exists(os.path.join(generated, n))]
    if missing:
        raise DataError(f"{generated}: no reconstruction for {len(missing)} reference image(s), e.g. {missing[0]}")
    load = lambda folder: [{"image_path": os.path.join(folder, n), "where": os.path.join(folder, n)} for n in names]
    size = Image.open(os.path.join(references, names[0])).size[0]
    return load_images(load(references), size), load_images(load(generated), size), names


def reconstruct(model, rt, sources, cfg, generator) -> tuple[list[str], torch.Tensor]:
    """Protocol 1: each source's caption (I2T), then the image redrawn from it (T2I)."""
    with rt.autocast():
        texts = model.describe(sources, cfg.temperature, cfg.max_new_tokens, cfg.greedy, cfg.batch_size)
    return texts, generate_from(model, rt, texts, cfg, generator)


@torch.no_grad()
def generate_from(model, rt, texts, cfg, generator) -> torch.Tensor:
    with rt.autocast():
        images = model.generate(texts, cfg.sample_steps, cfg.cfg_scale, generator=generator, batch_size=cfg.batch_size)
    return (images * 255).round().to(torch.uint8).cpu()


def evaluate(cfg) -> dict:
    rt = M.setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    backbones = {}
    for key in BACKBONES:
        spec = getattr(cfg, key)
        if spec:
            backbones[key] = load_backbone(spec, rt.device)
        else:
            print(f"backbone {key}: not configured, skipped")
    if not backbones:
        raise ValueError(f"no backbone configured: set at least one of {', '.join('--' + k for k in BACKBONES)}")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.generated:
        sources, recons, names = load_folder_pairs(cfg.generated, cfg.references)
        results = score(backbones, sources, recons, names)
    else:
        if not cfg.ckpt:
            raise ValueError("give --ckpt=<UAE checkpoint> or --generated=<folder> --references=<folder>")
        records = read_jsonl(cfg.data)
        names = [os.path.basename(r["image"]) for r in records]
        first = {}
        for r, name in zip(records, names):  # reconstructions are stored and matched by file name
            if first.setdefault(name, r["where"]) != r["where"]:
                raise DataError(f"{r['where']}: image file name {name} is also used at {first[name]}")
        sources = load_images(records)
        model = M.UAE.load(cfg.ckpt).to(rt.device).eval()
        generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        texts, recons = reconstruct(model, rt, sources, cfg, generator)
        os.makedirs(os.path.join(cfg.out_dir, "reconstructions"), exist_ok=True)
        for name, image in zip(names, recons):
            Image.fromarray(to_uint8_hwc(image)).save(os.path.join(cfg.out_dir, "reconstructions", name))
        with open(os.path.join(cfg.out_dir, "captions.jsonl"), "w") as f:
            f.writelines(json.dumps({"image": n, "caption": t}) + "\n" for n, t in zip(names, texts))
        save_grid([(s, t, r) for s, t, r in list(zip(sources, texts, recons))[:16]], os.path.join(cfg.out_dir, "grid.png"))
        results = score(backbones, sources, recons, names)
        scenes = shapes.scenes_of(records)
        if scenes is not None:  # the shapes world: exact oracle tables
            results["understanding"] = shapes.caption_report(texts, scenes)
            results["unification"] = {"unified_score": results["unified_score"], "scene_f1": float(np.mean(
                [shapes.scene_f1(shapes.detect_scene(s), shapes.detect_scene(r)) for s, r in zip(sources, recons)]))}
            if cfg.geneval:
                generator.manual_seed(cfg.seed)
                generated = generate_from(model, rt, [r["caption"] for r in records], cfg, generator)
                results["generation"] = shapes.generation_report(generated, scenes)
    results["config"] = vars(cfg)
    write_json(os.path.join(cfg.out_dir, "results.json"), results)
    return results


def summary(results: dict) -> str:
    lines = [f"Unified-Score {results['unified_score']:.2f} (" + ", ".join(
        f"{k} {results[k]['average']:.4f}" for k in BACKBONES if k in results) + ")"]
    for table in ("understanding", "generation", "unification"):
        if table in results:
            lines.append(f"{table}: " + shapes.format_report(results[table]))
    return "\n".join(lines)


def main(argv=None):
    cfg = configure(config, argv)
    results = evaluate(cfg)
    print(summary(results))
    print(f"wrote {os.path.join(cfg.out_dir, 'results.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
