"""Unified-Bench (Protocol 1): how well does a model reconstruct an image through its own caption?

For every source image the model writes a caption (I2T) and redraws the image from it (T2I). Each judge
(CLIP ViT-L/14, LongCLIP-L, DINOv2-L, DINOv3-L in the paper) embeds source and reconstruction; the cosine
of the L2-normalised features is the image's score under that judge, and Unified-Score = 100 x the mean
over judges of their bench averages (DESIGN §7). Scoring follows the released scorer (Score_i2i.py of the
UAE release): an hf: judge gets each image as a PIL image through its own image processor, CLIP's feature
is get_image_features and a DINO model's the CLS token; in folder mode a source's reconstruction is the
file of the same name, else of the same name without extension, else recon_<stem>.<any image extension>.
The checkpoint's model.json picks the architecture (checkpoint_parts.load_autoencoder): a UAE, or a UMM2
that captions and draws VQ tokens (guided by cfg_scale; Janus-Pro: 5) with its one LLM.

The judges are kept apart from the RL reward's backbone (`reward_backbone`): a bench scored by the very
model the RL stages maximised would reward fitting that model; its cosine is reported on its own, as
reward_cosine, never in the Unified-Score.

    python eval_unified.py --ckpt=out/grpo_decoder                          # shapes bench
    python eval_unified.py --ckpt=out/x --data=my/bench.jsonl --clip=hf:/ckpt/clip-vit-large-patch14 \
        --longclip=open_clip:ViT-L-14-quickgelu:/ckpt/longclip-L.pt --dinov2=hf:/ckpt/dinov2-large \
        --dinov3=hf:/ckpt/dinov3-vitl16-pretrain-lvd1689m --reward_backbone=
    python eval_unified.py --generated=any_model_outputs/ --references=sources/   # score another model's images

Writes out_dir/: reconstructions/ (<stem>.png), captions.jsonl, grid.png and results.json: the released
scorer's model_types, similarities_by_model (a source without reconstruction: null), statistics_by_model
(total_images = sources, valid_pairs = those matched) and summary, plus unified_score and reward_cosine
with their _per_image lists (two checkpoints compared image by image: paired_difference, mcnemar). On the shapes world (records carry "scene") it adds the oracle tables:
understanding (recall, small-object recall, attribute accuracy, precision, caption length), generation
and generation_partial (the decoder alone, from the TRUE complete and partial captions: generation_tables;
decoder_comparison tests two of them image by image), unification (Unified-Score, reward cosine,
scene-F1 of source vs reconstruction, mentioned-object recall: of the objects a caption names, the fraction
its reconstruction shows; captions_cut: captions the length cap stopped before their end; turns_cut:
captions whose text re-encoded longer than the decoder's window, cut to it; unknown_word_captions: captions
with a word the model's tokenizer reads as [UNK], also printed as a warning).
"""
import json
import math
import os
import sys

import numpy as np
import torch
from PIL import Image

import shapes
from checkpoint_parts import load_autoencoder
from common import checkpoint_rule, folder_rule, RULES, setup_runtime, spec_rule
from configurator import check, configure, must, only_if
from data import DataError, IMAGE_EXTENSIONS, load_image, read_records, save_grid, to_uint8_hwc, write_json
from reward import cosine, load_backbone

config = dict(
    ckpt="",  # UAE or UMM2 checkpoint to evaluate (empty with --generated: score existing images)
    data="data/shapes/bench.jsonl",  # source images: a JSONL (the shapes world adds scenes) or a folder of images
    generated="",  # folder of reconstructions to score against --references (matched as the released scorer does)
    references="",  # folder of source images for --generated
    out_dir="out/eval",  # where reconstructions, captions, grid and results.json go
    clip="hf:data/shapes/judges/clip",  # judge (paper: CLIP ViT-L/14), hf:<dir> or open_clip:<name>:<file>, empty = skipped
    longclip="open_clip:ShapesLongCLIP:data/shapes/judges/longclip.pt",  # judge (paper: LongCLIP-L), empty = skipped
    dinov2="hf:data/shapes/judges/dinov2",  # judge (paper: DINOv2-L), empty = skipped
    dinov3="",  # judge (paper: DINOv3 ViT-L/16), empty = skipped
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # the RL reward's backbone: reward_cosine only, empty = skipped
    greedy=True,  # greedy captions (deterministic); False samples at `temperature`
    temperature=0.7,  # caption sampling temperature when not greedy
    max_new_tokens=0,  # caption length cap (0 = the decoder's window; model.caption_cap)
    sample_steps=30,  # Euler steps of the decoder (UAE)
    cfg_scale=1.25,  # classifier-free guidance scale (UAE, shapes world: best of 1-3, README "guidance"; UMM2: Janus-Pro's 5)
    batch_size=50,  # images per forward
    compile=True,  # torch.compile the DiT (UMM2: its VQ decoder; model.compile_decoder)
    weights_dtype="float32",  # dtype the checkpoint is loaded in (paper: bfloat16, half the memory)
    geneval=True,  # shapes world: also generate from the true long captions (GenEval-shapes)
    device="auto",  # auto = cuda if available else cpu
    dtype="auto",  # auto = bfloat16 (cpu / modern gpus) else float16
    seed=0,  # sampling seed (the same noise for every checkpoint)
)
JUDGES = ("clip", "longclip", "dinov2", "dinov3")  # the released scorer's model names
folders = lambda cfg: bool(cfg.generated)  # scoring existing images: no checkpoint, no data
rules = RULES | dict(  # valid values beyond the types (configurator), checked by evaluate before any work; shared keys' in common.RULES
    ckpt=only_if(lambda cfg: not folders(cfg), checkpoint_rule(kind="UAE or UMM2")),  # or --generated with --references
    data=only_if(lambda cfg: not folders(cfg), must(lambda v, c: os.path.exists(v), "a JSONL file or a folder of images")),
    generated=only_if(folders, folder_rule()),
    references=only_if(folders, folder_rule()),
    clip=spec_rule(optional=True),
    longclip=spec_rule(optional=True),
    dinov2=spec_rule(optional=True),
    dinov3=spec_rule(optional=True),
    reward_backbone=spec_rule(optional=True),
)


def similarities(backbone, names: list[str], sources: list, recons: list, batch_size: int) -> dict:
    """{name: cosine of the features of source and reconstruction}, None where the reconstruction is None.
    Images are (H, W, 3) uint8 of any sizes; backbone.features preprocesses each as its judge expects."""
    pairs = [i for i, r in enumerate(recons) if r is not None]
    cos = cosine(backbone.features([sources[i] for i in pairs], batch_size),
                 backbone.features([recons[i] for i in pairs], batch_size)).tolist()
    return {**dict.fromkeys(names), **{names[i]: c for i, c in zip(pairs, cos)}}


def released_results(sims: dict) -> dict:
    """The released scorer's results.json from {judge: similarities}: statistics over the matched images,
    the summary (its best/worst_model tuples are [name, average] in JSON)."""
    stats = {}
    for judge, scores in sims.items():
        valid = [s for s in scores.values() if s is not None]
        stats[judge] = {"total_images": len(scores), "valid_pairs": len(valid), "average_similarity": sum(valid) / len(valid),
                        "min_similarity": min(valid), "max_similarity": max(valid)}
    averages = {judge: s["average_similarity"] for judge, s in stats.items()}
    summary = {"models_used": list(averages), "average_scores_by_model": averages,
               "overall_average": sum(averages.values()) / len(averages),
               "best_model": list(max(averages.items(), key=lambda x: x[1])),
               "worst_model": list(min(averages.items(), key=lambda x: x[1]))}
    return {"model_types": list(sims), "similarities_by_model": sims, "statistics_by_model": stats, "summary": summary}


def score(judges: dict, reward_backbone, names: list[str], sources: list, recons: list, batch_size: int) -> dict:
    """The released layout for the judges, plus the Unified-Score (overall, per matched image) and the
    reward backbone's mean cosine (None when it is not configured)."""
    sims = {key: similarities(judge, names, sources, recons, batch_size) for key, judge in judges.items()}
    results = released_results(sims)
    matched = [n for n, r in zip(names, recons) if r is not None]
    results["unified_score"] = 100 * results["summary"]["overall_average"]
    results["unified_score_per_image"] = {n: 100 * sum(s[n] for s in sims.values()) / len(sims) for n in matched}
    results["reward_cosine"] = results["reward_cosine_per_image"] = None
    if reward_backbone is not None:
        reward = similarities(reward_backbone, names, sources, recons, batch_size)
        results["reward_cosine"] = sum(reward[n] for n in matched) / len(matched)
        results["reward_cosine_per_image"] = {n: reward[n] for n in matched}
    return results


def match_folders(generated: str, references: str) -> tuple[list[str], list, list]:
    """(names, sources, reconstructions) of the images in `references`, each source's reconstruction in
    `generated` found as the released scorer finds it (same file name, else same name without extension,
    else recon_<stem>.*) or None; unmatched sources are printed, none matched at all is an error."""
    for folder, flag in ((generated, "--generated"), (references, "--references")):
        if not os.path.isdir(folder):
            raise DataError(f"{flag}: no such folder '{folder}'")
    images = lambda folder: sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    names, found = images(references), images(generated)
    if not names:
        raise DataError(f"{references}: no images")
    stem = lambda f: os.path.splitext(f)[0]
    match = {n: ([f for f in found if f == n] + [f for f in found if stem(f) == stem(n)] +
                 [f for f in found if stem(f) == "recon_" + stem(n)] + [None])[0] for n in names}
    missing = [n for n in names if match[n] is None]
    if len(missing) == len(names):
        raise DataError(f"no image of {generated} matches any of the {len(names)} images of {references} "
                        f"(by name, name without extension or recon_<stem>)")
    if missing:
        print(f"{len(missing)} of {len(names)} images of {references} have no reconstruction in {generated} "
              f"(they score null), e.g. {missing[0]}")
    load = lambda folder, f, flag: load_image({"image_path": os.path.join(folder, f), "where": flag}, over_white=False)
    return (names, [load(references, n, "--references") for n in names],
            [load(generated, match[n], "--generated") if match[n] else None for n in names])


def reconstruct(model, rt, sources, cfg, generator) -> tuple[list[str], torch.Tensor]:
    """Protocol 1: each source's caption (I2T), then the image redrawn from it (T2I)."""
    with rt.autocast():
        texts = model.describe(sources, cfg.temperature, cfg.max_new_tokens, cfg.greedy, cfg.batch_size)
    return texts, generate_from(model, rt, texts, cfg, generator, allow_cut=True)  # the model's own captions


@torch.no_grad()
def generate_from(model, rt, texts, cfg, generator, allow_cut: bool = False) -> torch.Tensor:
    with rt.autocast():
        images = model.generate(texts, steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, generator=generator,
                                batch_size=cfg.batch_size, allow_cut=allow_cut)
    return (images * 255).round().to(torch.uint8).cpu()


def evaluate(cfg) -> dict:
    check(cfg, rules)
    if not any(getattr(cfg, key) for key in JUDGES):
        raise ValueError(f"no judge configured: set at least one of {', '.join('--' + k for k in JUDGES)}")
    # ---- inputs, every line checked before any model is loaded
    if cfg.generated:
        pairs = match_folders(cfg.generated, cfg.references)
    else:
        records = read_records(cfg.data, need_caption=False)  # a Unified-Bench folder has no captions
        names = [os.path.basename(r["image"]) for r in records]
        files = [os.path.splitext(n)[0] + ".png" for n in names]  # lossless, and found by the released matching
        first = {}
        for r, name, file in zip(records, names, files):
            if first.setdefault(file, r["where"]) != r["where"]:
                raise DataError(f"{r['where']}: image file name {name} gives reconstruction {file}, as {first[file]} does")
        scenes = shapes.scenes_of(records)  # the shapes world's: exact oracle tables
        sources = [load_image(r, over_white=False) for r in records]  # as the released scorer reads them; sizes mixed
        if scenes is not None:  # the oracle reads the world's canvas
            odd = next((r for r, s in zip(records, sources) if s.shape != (shapes.CANVAS, shapes.CANVAS, 3)), None)
            if odd is not None:
                raise DataError(f"{odd['where']}: image {odd['image_path']} is not {shapes.CANVAS}x{shapes.CANVAS}, the shapes "
                                f"world's canvas its \"scene\" is read on")
    # ---- models
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed)
    judges = {}
    for key in JUDGES:
        if getattr(cfg, key):
            judges[key] = load_backbone(getattr(cfg, key), rt.device)
        else:
            print(f"judge {key}: not configured, skipped")
    reward_backbone = load_backbone(cfg.reward_backbone, rt.device) if cfg.reward_backbone else None
    if reward_backbone is None:
        print("reward_backbone: not configured, skipped")
    os.makedirs(cfg.out_dir, exist_ok=True)
    if cfg.generated:
        results = score(judges, reward_backbone, *pairs, cfg.batch_size)
    else:
        model = load_autoencoder(cfg.ckpt, dtype=getattr(torch, cfg.weights_dtype)).to(rt.device).eval()  # UAE or UMM2
        model.caption_cap(cfg.max_new_tokens)  # fail now, not at the first caption
        geneval = cfg.geneval and scenes is not None
        if geneval:  # the true captions the decoder draws: present, in its vocabulary, inside its window
            for field in ("caption",) + (("partial_caption",) if all("partial_caption" in r for r in records) else ()):
                model.check_texts(records, field)
        if cfg.compile:
            model.compile_decoder()
        generator = torch.Generator(device=rt.device).manual_seed(cfg.seed)
        texts, recons = reconstruct(model, rt, sources, cfg, generator)
        recons = [to_uint8_hwc(r) for r in recons]
        os.makedirs(os.path.join(cfg.out_dir, "reconstructions"), exist_ok=True)
        for file, image in zip(files, recons):
            Image.fromarray(image).save(os.path.join(cfg.out_dir, "reconstructions", file))
        with open(os.path.join(cfg.out_dir, "captions.jsonl"), "w") as f:
            f.writelines(json.dumps({"image": n, "caption": t}) + "\n" for n, t in zip(names, texts))
        save_grid([(s, t, r) for s, t, r in list(zip(sources, texts, recons))[:16]], os.path.join(cfg.out_dir, "grid.png"))
        results = score(judges, reward_backbone, names, sources, recons, cfg.batch_size)
        if model.unknown_word_captions:
            print(f"warning: {model.unknown_word_captions} caption(s) had words the model's tokenizer does not know: "
                  f"the decoder read them as {model.tokenizer.unk_token} (unification: unknown_word_captions)")
        if scenes is not None:  # the shapes world: exact oracle tables
            results["understanding"] = shapes.caption_report(texts, scenes)
            results["unification"] = {
                "unified_score": results["unified_score"], "reward_cosine": results["reward_cosine"],
                "scene_f1": float(np.mean([shapes.scene_f1(shapes.detect_scene(s), shapes.detect_scene(r))
                                           for s, r in zip(sources, recons)])),
                "mentioned_object_recall": shapes.mentioned_object_recall(texts, recons),
                "captions_cut": model.captions_cut(texts, cfg.max_new_tokens),  # stopped by the length cap
                "turns_cut": model.turns_cut,  # re-encoded longer than the window, cut to it (model.text_tokens)
                "unknown_word_captions": model.unknown_word_captions}  # with words the tokenizer maps to [UNK]
            if geneval:
                results.update(generation_tables(model, rt, cfg, generator, records, names, sources, scenes, judges))
    results["config"] = vars(cfg)
    write_json(os.path.join(cfg.out_dir, "results.json"), results)
    return results


def generation_tables(model, rt, cfg, generator, records, names, sources, scenes, judges) -> dict:
    """Shapes world, the decoder alone (Understanding for Generation), from the TRUE captions, with the same
    noise as the reconstructions. generation: from the complete long captions, GenEval-shapes (overall =
    exact scene), extra objects drawn per image, text reliance (model.measure_text_reliance) and the judges'
    Unified-Score of these images (the ceiling a caption could reach with this decoder). generation_partial:
    from the partial captions (details left out), the images that draw every stated detail, mentioned-object
    recall and extra objects, beside the objects the captions left out (what the guesses should match).
    Per-image values ride along for paired tests (mcnemar, paired_difference)."""
    per = lambda values: dict(zip(names, values))
    complete = [r["caption"] for r in records]
    generator.manual_seed(cfg.seed)
    drawn = [to_uint8_hwc(g) for g in generate_from(model, rt, complete, cfg, generator)]
    exact = [shapes.detect_scene(g) == sc for g, sc in zip(drawn, scenes)]
    extra = shapes.caption_fidelity(complete, drawn)["extra_objects"]
    ceiling = score(judges, None, names, sources, drawn, cfg.batch_size)
    images = torch.from_numpy(np.stack(sources)).permute(0, 3, 1, 2)
    reliance = model.measure_text_reliance(rt, images, complete, generator.manual_seed(cfg.seed), cfg.batch_size)
    tables = {"generation": shapes.generation_report(drawn, scenes) | {
        "extra_objects": float(np.mean(extra)), "text_reliance": reliance["text_reliance"],
        "unified_score": ceiling["unified_score"], "overall_per_image": per(exact),
        "extra_objects_per_image": per(extra), "text_reliance_per_image": per(reliance["per_image"]),
        "unified_score_per_image": ceiling["unified_score_per_image"]}}
    if all("partial_caption" in r for r in records):
        partial = [r["partial_caption"] for r in records]
        generator.manual_seed(cfg.seed)
        drawn = [to_uint8_hwc(g) for g in generate_from(model, rt, partial, cfg, generator)]
        fidelity = shapes.caption_fidelity(partial, drawn)
        left_out = [len(sc) - len(shapes.parse_caption(t)) for t, sc in zip(partial, scenes)]
        tables["generation_partial"] = {
            "satisfied": float(np.mean(fidelity["satisfied"])),
            "mentioned_object_recall": shapes.mentioned_object_recall(partial, drawn),
            "extra_objects": float(np.mean(fidelity["extra_objects"])), "objects_left_out": float(np.mean(left_out)),
            "satisfied_per_image": per(fidelity["satisfied"]), "extra_objects_per_image": per(fidelity["extra_objects"])}
    return tables


def summary(results: dict) -> str:
    stats = next(iter(results["statistics_by_model"].values()))
    line = (f"Unified-Score {results['unified_score']:.2f} (" + ", ".join(
        f"{k} {v:.4f}" for k, v in results["summary"]["average_scores_by_model"].items()) +
        f") on {stats['valid_pairs']}/{stats['total_images']} images")
    if results["reward_cosine"] is not None:
        line += f"; reward backbone cosine {results['reward_cosine']:.4f} (not a judge)"
    return "\n".join([line] + [f"{table}: " + shapes.format_report(results[table])
                               for table in ("understanding", "generation", "generation_partial", "unification")
                               if table in results])


# ----------------------------------------------------------------------------- paired comparisons

def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b), by its continued fraction (modified Lentz; Numerical Recipes
    6.4), which converges fast for x < (a + 1) / (a + b + 2); above it I_x(a, b) = 1 - I_{1-x}(b, a)."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    if x > (a + 1) / (a + b + 2):
        return 1 - _betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(1000):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-30 else 1e-30)
        c = 1 + num / c
        c = c if abs(c) > 1e-30 else 1e-30
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a * (f - 1)


def t_p_value(t: float, df: float) -> float:
    """Two-sided p of Student's t with df degrees of freedom: P(|T| >= |t|) = I_{df/(df+t^2)}(df/2, 1/2)."""
    return _betainc(df / 2, 0.5, df / (df + t * t))


def t_critical(df: float, alpha: float = 0.05) -> float:
    """The t whose two-sided p is alpha (the 1 - alpha/2 quantile), by bisection: p falls as t grows."""
    lo, hi = 0.0, 1.0
    while t_p_value(hi, df) > alpha:
        lo, hi = hi, 2 * hi
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_p_value(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def paired_difference(a: dict, b: dict) -> dict:
    """b - a over the images both score ({name: score}, e.g. two runs' unified_score_per_image): its mean,
    95% t-interval and two-sided paired t-test p."""
    names = sorted(a.keys() & b.keys())
    if len(names) < 2:
        raise ValueError(f"a paired t-test needs at least 2 images scored in both, got {len(names)}")
    d = np.array([b[k] - a[k] for k in names], dtype=np.float64)
    n, mean = len(d), float(d.mean())
    se = float(d.std(ddof=1)) / math.sqrt(n)
    t = abs(mean) / se if se else (math.inf if mean else 0.0)
    half = t_critical(n - 1) * se
    return {"n": n, "mean": mean, "ci95": [mean - half, mean + half], "p": t_p_value(t, n - 1)}


def mcnemar(a: dict, b: dict) -> dict:
    """Exact McNemar test of paired pass/fail over the images both judge ({name: bool}): lost = passed in a
    only, gained = passed in b only; p = the two-sided binomial test of the discordant pairs at 1/2."""
    names = a.keys() & b.keys()
    lost = sum(bool(a[k]) and not b[k] for k in names)
    gained = sum(bool(b[k]) and not a[k] for k in names)
    m = lost + gained
    p = min(1.0, 2 * sum(math.comb(m, i) for i in range(min(lost, gained) + 1)) / 2 ** m)
    return {"n": len(names), "lost": lost, "gained": gained, "p": p}


def decoder_comparison(before: dict, after: dict, subset: set[str]) -> dict:
    """Two evaluations' decoder tables (generation_tables) compared image by image: {figure: {before, after,
    p}}, McNemar for exact-scene rates, the paired t-test for per-image means. `subset`: the images of the
    >=3-object rate. Text reliance is the ratio of summed errors; its p is that of the per-image ratios."""
    rows = {}
    def rate(name, a, b, names=None):
        a, b = ({k: v for k, v in d.items() if names is None or k in names} for d in (a, b))
        rows[name] = {"before": float(np.mean(list(a.values()))), "after": float(np.mean(list(b.values()))),
                      "p": mcnemar(a, b)["p"]}
    def mean(name, a, b, headline=None):
        rows[name] = {"before": headline[0] if headline else float(np.mean(list(a.values()))),
                      "after": headline[1] if headline else float(np.mean(list(b.values()))),
                      "p": paired_difference(a, b)["p"]}
    g0, g1 = before["generation"], after["generation"]
    rate("geneval_shapes", g0["overall_per_image"], g1["overall_per_image"])
    rate("geneval_shapes_3plus", g0["overall_per_image"], g1["overall_per_image"], subset)
    mean("extra_objects", g0["extra_objects_per_image"], g1["extra_objects_per_image"])
    mean("text_reliance", g0["text_reliance_per_image"], g1["text_reliance_per_image"], (g0["text_reliance"], g1["text_reliance"]))
    if "generation_partial" in before and "generation_partial" in after:
        p0, p1 = before["generation_partial"], after["generation_partial"]
        rate("partial_satisfied", p0["satisfied_per_image"], p1["satisfied_per_image"])
        mean("partial_extra_objects", p0["extra_objects_per_image"], p1["extra_objects_per_image"])
    return rows


def main(argv=None):
    cfg = configure(config, argv)  # evaluate checks the rules
    results = evaluate(cfg)
    print(summary(results))
    print(f"wrote {os.path.join(cfg.out_dir, 'results.json')}")


if __name__ == "__main__":
    main(sys.argv[1:])
