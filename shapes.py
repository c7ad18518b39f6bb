"""The shapes world: a tiny, fully verifiable stand-in for natural images (DESIGN §6, §7).

A scene is 1-4 (up to 9) coloured shapes in distinct cells of a 3x3 grid on a 48x48 canvas. Every
image and every caption can be parsed back into its scene without any learning, so all metrics here
are exact oracles:

    render(scene) -> image             detect_scene(image) -> scene
    long_caption(scene) -> text        parse_caption(text) -> scene
    short_caption(scene, rng) -> text  (under-describes: small objects are rarely mentioned)
    partial_caption(scene, rng) -> text  (a long caption with details left out)

Complete long captions are the ground truth of GenEval-shapes (the paper's 250-word "long-context"
captions); short captions are the base encoder's (web alt-text that omits small things, the gap UAE's
RL closes). The decoder learns from a mix of all three styles, as a T2I model learns from web text, so
it draws something sensible for any caption and guesses what a caption leaves out (DESIGN §6).
Splits are disjoint as scenes (`scene_key`, jitter ignored): `check_disjoint` proves it.
"""
import dataclasses
import random
import re
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from data import DataError, to_uint8_hwc

CANVAS = 48  # 3 cells of 16 px: with the f=4 VAE and DiT patch 4 one image token is exactly one cell
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
COLORS = {  # well separated in RGB: the closest pair (blue, purple) is >110 apart, noise sigma is 8
    "red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
    "yellow": (235, 200, 30), "purple": (150, 60, 190), "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle")
SIZES = ("large", "small")
BACKGROUND = (245, 245, 240)
EXTENT = {"large": 12, "small": 6}  # side of the bounding box in pixels
JITTER = 1  # max |offset| from the cell centre; large objects (12 + 2*1 px) stay inside 16-px cells
CELL = CANVAS // 3
CELL_CENTERS = (CELL // 2, CELL + CELL // 2, 2 * CELL + CELL // 2)
CELL_EDGES = (0, CELL, 2 * CELL, CANVAS)  # pixel ranges of the three rows/columns
SHORT_MENTION_P = {"large": 0.7, "small": 0.1}  # DESIGN §6: large often, small about 1 in 10
SHORT_ATTRIBUTE_P = 0.3  # chance that a short caption states the size / the position of a mention
PARTIAL_P = 0.5  # partial long captions: chance of stating each small object, each size, each position
WINDOW_OBJECTS = 6  # the decoder's text window fits the long caption of any scene of this many objects
CAPTION_PROMPT = "describe this image in detail."  # the encoder's instruction (the paper's: "Given an input image, generate a textual description ...")


@dataclass(frozen=True, order=True)
class Obj:
    """One object. Position jitter is for rendering only: it is not part of the scene's identity."""
    pos: str | None
    color: str
    shape: str
    size: str | None
    dx: int = field(default=0, compare=False)
    dy: int = field(default=0, compare=False)

    def to_json(self) -> dict:
        return {"pos": self.pos, "color": self.color, "shape": self.shape, "size": self.size, "dx": self.dx, "dy": self.dy}


def canonical(objs) -> tuple:
    """A scene is a tuple of objects in reading order (unknown positions last)."""
    key = lambda o: (POSITIONS.index(o.pos) if o.pos else len(POSITIONS), o.color, o.shape, o.size or "")
    return tuple(sorted(objs, key=key))


SCENE_VALUES = {"pos": POSITIONS, "color": tuple(COLORS), "shape": SHAPES, "size": SIZES}


def scene_from_json(items: list[dict], where: str = "scene") -> tuple:
    """A scene from its JSON (a JSONL line's "scene": a list of {pos, color, shape, size, dx, dy}). Every field
    is checked, a bad one named with `where` (the line's file:line) and the valid values: an unknown colour
    would skew the metrics, an unknown position fail after all the work."""
    if not isinstance(items, list):
        raise DataError(f"{where}: \"scene\" must be a list of objects, got {json_name(items)}")
    objs = []
    for n, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{where}: scene object {n} must be an object {{pos, color, shape, size, dx, dy}}, got {json_name(item)}")
        unknown = sorted(set(item) - set(SCENE_VALUES) - {"dx", "dy"})
        if unknown:
            raise DataError(f"{where}: scene object {n} has unknown field(s) {', '.join(unknown)}; valid: pos, color, shape, size, dx, dy")
        for key, values in SCENE_VALUES.items():
            if item.get(key) not in values:
                raise DataError(f"{where}: scene object {n}: {key} {item.get(key)!r} is not one of {', '.join(values)}")
        for key in ("dx", "dy"):
            if type(item.get(key, 0)) is not int or abs(item.get(key, 0)) > JITTER:
                raise DataError(f"{where}: scene object {n}: {key} {item[key]!r} must be an integer in [-{JITTER}, {JITTER}]")
        objs.append(Obj(**item))
    for attrs, what in (((lambda o: o.pos), "cell"), ((lambda o: (o.color, o.shape)), "colour and shape")):
        seen = [attrs(o) for o in objs]
        twice = next((a for a in seen if seen.count(a) > 1), None)
        if twice is not None:
            raise DataError(f"{where}: two scene objects share the {what} {twice}: a scene's objects have distinct ones")
    return canonical(objs)


def json_name(value) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null", bool: "a boolean"}.get(type(value), "a number")


# ----------------------------------------------------------------------------- sampling, rendering

def scenes_of(records: list[dict]) -> list[tuple] | None:
    """The records' scenes (checked: scene_from_json) when they have them (the shapes world), else None: the
    oracle tables need them, and any other dataset simply has no such tables. Some lines with a scene and
    some without is an error naming the first line without."""
    having = [r for r in records if "scene" in r]
    if not having:
        return None
    if len(having) < len(records):
        first = next(r for r in records if "scene" not in r)
        raise DataError(f"{first['where']}: no \"scene\", while {having[0]['where']} has one: give every line a scene "
                        f"(the shapes world) or none")
    return [scene_from_json(r["scene"], r["where"]) for r in records]


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 4) -> tuple:
    """Distinct cells, distinct (colour, shape) pairs, sizes 50/50, integer jitter in [-JITTER, JITTER]."""
    n = rng.randint(min_objects, max_objects)
    cells = rng.sample(POSITIONS, n)
    kinds = rng.sample([(c, s) for c in COLORS for s in SHAPES], n)
    return canonical(Obj(pos, color, shape, rng.choice(SIZES), rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER))
                     for pos, (color, shape) in zip(cells, kinds))


def scene_key(scene: tuple) -> tuple:
    """A scene's identity: its objects without the rendering jitter (Obj compares without dx, dy)."""
    return tuple(Obj(o.pos, o.color, o.shape, o.size) for o in canonical(scene))


def sample_disjoint(rng: random.Random, n: int, taken: set, min_objects: int = 1, max_objects: int = 4) -> list[tuple]:
    """n scenes, none equal (scene_key) to one in `taken` or to each other; adds their keys to `taken`.
    Held-out splits are drawn this way after train, so they never repeat a training scene (with 20,000
    training scenes of 1-4 objects every one-object scene is in train, so held-out scenes have 2-4)."""
    scenes, tries = [], 0
    while len(scenes) < n:
        tries += 1
        if tries > 1000 * (n + 1):
            raise RuntimeError(f"sample_disjoint: cannot find {n} new scenes ({len(taken)} taken)")
        scene = sample_scene(rng, min_objects, max_objects)
        if scene_key(scene) not in taken:
            taken.add(scene_key(scene))
            scenes.append(scene)
    return scenes


def check_disjoint(splits: dict[str, list[tuple]]) -> dict[str, int]:
    """The number of scenes each pair of splits shares (jitter ignored), and the repeats within each
    held-out split; raises if any is nonzero outside train. prepare.py runs it; the tests call it."""
    keys = {name: [scene_key(s) for s in scenes] for name, scenes in splits.items()}
    sets = {name: set(k) for name, k in keys.items()}
    names = list(splits)
    overlaps = {f"{a}&{b}": len(sets[a] & sets[b]) for i, a in enumerate(names) for b in names[i + 1:]}
    overlaps |= {f"{a} repeats": len(keys[a]) - len(sets[a]) for a in names if a != "train"}
    bad = {k: v for k, v in overlaps.items() if v}
    if bad:
        raise ValueError(f"splits overlap (scenes equal up to jitter): {bad}")
    return overlaps


def rejitter(scene: tuple, rng: random.Random) -> tuple:
    """The same scene with new position jitter (used to test that a backbone sees content, not pixels)."""
    return tuple(Obj(o.pos, o.color, o.shape, o.size, rng.randint(-JITTER, JITTER), rng.randint(-JITTER, JITTER)) for o in scene)


_ys, _xs = np.mgrid[0:CANVAS, 0:CANVAS] + 0.5  # pixel centres


def object_mask(obj: Obj) -> np.ndarray:
    i = POSITIONS.index(obj.pos)
    cx, cy, h = CELL_CENTERS[i % 3] + obj.dx, CELL_CENTERS[i // 3] + obj.dy, EXTENT[obj.size] / 2
    if obj.shape == "square":
        return (np.abs(_xs - cx) < h) & (np.abs(_ys - cy) < h)
    if obj.shape == "circle":
        return (_xs - cx) ** 2 + (_ys - cy) ** 2 < h * h
    # upward isosceles triangle: apex at the top of the box, base at the bottom
    return (_ys > cy - h) & (_ys < cy + h) & (np.abs(_xs - cx) < (_ys - cy + h) / 2)


def render(scene: tuple) -> np.ndarray:
    """Scene -> (48, 48, 3) uint8 image with hard edges (so the oracle is exact on clean renders)."""
    image = np.empty((CANVAS, CANVAS, 3), np.uint8)
    image[:] = BACKGROUND
    for obj in scene:
        image[object_mask(obj)] = COLORS[obj.color]
    return image


# ----------------------------------------------------------------------------- captions

def _phrase(obj: Obj) -> str:
    words = ["a"] + ([obj.size] if obj.size else []) + [obj.color, obj.shape]
    return " ".join(words + (["at the", obj.pos] if obj.pos else []))


def _join(phrases: list[str]) -> str:
    if not phrases:
        return "some shapes."
    body = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return body + "."


def long_caption(scene: tuple) -> str:
    """Every object with all four attributes, in reading order."""
    return _join([_phrase(o) for o in scene])


def object_question(scene: tuple, choice: int) -> tuple[str, str]:
    """A grounding question about one object of the scene and its answer, in the world's words: by kind
    ("describe the red circle." -> "a small red circle at the top left.") or by cell ("describe the
    top left." -> "a small red circle."). `choice` (any int) picks the object and the kind of question.
    The base encoder learns these beside its short captions (pretrain_encoder `grounding`): like a
    pretrained VLM, it can see every object, small ones included, and still caption briefly."""
    obj = scene[choice % len(scene)]
    if (choice // len(scene)) % 2 == 0:
        return f"describe the {obj.color} {obj.shape}.", _join([_phrase(obj)])
    return f"describe the {obj.pos}.", _join([_phrase(dataclasses.replace(obj, pos=None))])


def short_caption(scene: tuple, rng: random.Random) -> str:
    """A random subset: colour and shape always, size and position sometimes (DESIGN §6)."""
    mentioned = [Obj(o.pos if rng.random() < SHORT_ATTRIBUTE_P else None, o.color, o.shape,
                     o.size if rng.random() < SHORT_ATTRIBUTE_P else None)
                 for o in scene if rng.random() < SHORT_MENTION_P[o.size]]
    return _join([_phrase(o) for o in mentioned])


def partial_caption(scene: tuple, rng: random.Random) -> str:
    """A long caption with details left out: every large object, each small one with probability
    PARTIAL_P; each stated object's size and position each with probability PARTIAL_P (DESIGN §6)."""
    mentioned = [Obj(o.pos if rng.random() < PARTIAL_P else None, o.color, o.shape,
                     o.size if rng.random() < PARTIAL_P else None)
                 for o in scene if o.size == "large" or rng.random() < PARTIAL_P]
    return _join([_phrase(o) for o in mentioned])


def longest_long_caption(n_objects: int) -> str:
    """The longest long caption of any n-object scene (in words and tokens): every object large, at the
    positions with the most words. It sizes the decoder's text window (WINDOW_OBJECTS)."""
    cells = sorted(POSITIONS, key=lambda p: -len(p.split()))[:n_objects]
    kinds = [(c, k) for c in sorted(COLORS, key=len, reverse=True) for k in sorted(SHAPES, key=len, reverse=True)]
    return long_caption(canonical(Obj(p, c, k, "large") for p, (c, k) in zip(cells, kinds)))


def parse_caption(text: str) -> tuple:
    """Caption -> scene. Lenient, because model captions can be malformed: each clause (split at
    ',', 'and', '.') that names a colour and a shape is an object; size and position are read if
    stated (else None). A repeated (colour, shape) keeps its first mention."""
    clauses = text.lower().replace(",", " | ").replace(".", " | ").replace(" and ", " | ").split("|")
    objs, seen = [], set()
    for clause in clauses:
        words = clause.split()
        color = next((w for w in words if w in COLORS), None)
        shape = next((w for w in words if w in SHAPES), None)
        if color is None or shape is None or (color, shape) in seen:
            continue
        seen.add((color, shape))
        size = next((w for w in words if w in SIZES), None)
        pos = None
        if "at" in words:
            tail = " ".join(words[words.index("at") + 1:]).removeprefix("the ").strip()
            pos = tail if tail in POSITIONS else None
        objs.append(Obj(pos, color, shape, size))
    return canonical(objs)


# ----------------------------------------------------------------------------- the image oracle

_PALETTE = np.array([BACKGROUND] + list(COLORS.values()), np.float32)
_COLOR_NAMES = list(COLORS)
MIN_OBJECT_PIXELS = 12  # a small triangle has 18 px; specks left by a diffusion model have fewer
MAX_COLOR_DISTANCE = 90.0  # pixels farther than this from every palette colour are ignored


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Pixel coordinates (N, 2) of the largest 4-connected component of a small boolean mask."""
    seen = np.zeros_like(mask)
    best = np.zeros((0, 2), int)
    for start in zip(*np.nonzero(mask)):
        if seen[start]:
            continue
        seen[start] = True
        queue, comp = deque([start]), []
        while queue:
            y, x = queue.popleft()
            comp.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        if len(comp) > len(best):
            best = np.array(comp)
    return best


def classify_blob(pixels: np.ndarray) -> tuple[str, str]:
    """(size, shape) from a blob's pixels: extent decides size, bounding-box fill decides shape
    (square 1.0, circle pi/4 = 0.79, triangle 0.5)."""
    h, w = pixels.max(0) - pixels.min(0) + 1
    fill = len(pixels) / (h * w)
    size = "large" if max(h, w) > (EXTENT["large"] + EXTENT["small"]) / 2 else "small"
    shape = "square" if fill > 0.9 else "circle" if fill > 0.64 else "triangle"
    return size, shape


def detect_scene(image) -> tuple:
    """Image -> scene by colour segmentation and simple geometry (no learning).

    Each pixel takes its nearest palette colour; for every (colour, grid cell) the largest connected
    blob of at least MIN_OBJECT_PIXELS is an object whose size and shape come from classify_blob.
    Objects never leave their cell (jitter is bounded), so cells separate same-coloured objects."""
    rgb = to_uint8_hwc(image).astype(np.float32)
    if rgb.shape != (CANVAS, CANVAS, 3):  # the cells are those of the world's canvas: another size reads garbage
        raise ValueError(f"detect_scene reads {CANVAS}x{CANVAS} RGB images of the shapes world, got {rgb.shape[1]}x{rgb.shape[0]}")
    dist = np.linalg.norm(rgb[:, :, None, :] - _PALETTE[None, None], axis=-1)
    label = dist.argmin(-1)
    label[dist.min(-1) > MAX_COLOR_DISTANCE] = 0
    objs = []
    for ci, color in enumerate(_COLOR_NAMES, start=1):
        mask = label == ci
        if mask.sum() < MIN_OBJECT_PIXELS:
            continue
        for p, pos in enumerate(POSITIONS):
            r, c = divmod(p, 3)
            cell = mask[CELL_EDGES[r]:CELL_EDGES[r + 1], CELL_EDGES[c]:CELL_EDGES[c + 1]]
            if cell.sum() < MIN_OBJECT_PIXELS:
                continue
            blob = _largest_component(cell)
            if len(blob) >= MIN_OBJECT_PIXELS:
                size, shape = classify_blob(blob)
                objs.append(Obj(pos, color, shape, size))
    # Two blobs of one (colour, shape) cannot both be real (scenes never repeat a kind): keep the first
    # found, in colour order then cell order
    unique = {}
    for o in objs:
        unique.setdefault((o.color, o.shape), o)
    return canonical(unique.values())


# ----------------------------------------------------------------------------- metrics (DESIGN §7)

def caption_counts(text: str, scene: tuple) -> dict:
    """Counts for one caption against its true scene; sum them over a set, then caption_report."""
    mentions = parse_caption(text)
    truth = {(o.color, o.shape): o for o in scene}
    found = [m for m in mentions if (m.color, m.shape) in truth]  # an object counts when colour and shape are named
    stated = [(getattr(m, a), getattr(truth[(m.color, m.shape)], a)) for m in found for a in ("size", "pos") if getattr(m, a)]
    return {
        "objects": len(scene), "small_objects": sum(o.size == "small" for o in scene),
        "found": len(found), "found_small": sum(truth[(m.color, m.shape)].size == "small" for m in found),
        "mentions": len(mentions), "attributes_stated": len(stated),
        "attributes_correct": sum(said == true for said, true in stated), "words": len(text.split()),
    }


def caption_report(texts: list[str], scenes: list[tuple]) -> dict:
    """Understanding metrics, micro-averaged: recall, small-object recall, attribute accuracy of
    stated sizes/positions, precision (1 - hallucinated mentions), mean caption length in words."""
    totals = {}
    for text, scene in zip(texts, scenes, strict=True):
        for k, v in caption_counts(text, scene).items():
            totals[k] = totals.get(k, 0) + v
    ratio = lambda a, b: totals[a] / totals[b] if totals[b] else float("nan")
    return {"recall": ratio("found", "objects"), "small_object_recall": ratio("found_small", "small_objects"),
            "attribute_accuracy": ratio("attributes_correct", "attributes_stated"),
            "precision": ratio("found", "mentions"), "caption_length": totals["words"] / len(texts)}


def probe_captioner(model, rt, images, scenes, max_new_tokens: int, step: int, batch_size: int = 0) -> dict:
    """caption_report of a UAE's greedy captions of `images`, plus the first caption as an example, printed
    as one `eval step` line: the periodic probe of the encoder stages. The model is left in train mode,
    where the loops keep it."""
    model.eval()
    with rt.autocast():
        texts = model.describe(images, max_new_tokens=max_new_tokens, greedy=True, batch_size=batch_size)
    model.train()
    report = caption_report(texts, scenes) | {"example": texts[0]}
    rt.print(f"eval step {step} " + format_report(report) + f" | {report['example']}")
    return report


def probe_grounding(model, rt, images, scenes, step: int) -> dict:
    """Position accuracy of greedy answers to "describe the <colour> <shape>." for every object of the
    scenes (large and small apart): what the encoder can see, whether or not its captions say it."""
    pairs = [(im, o) for im, sc in zip(images, scenes) for o in sc]
    model.eval()
    with rt.autocast():
        texts = model.caption([im for im, _ in pairs], max_new_tokens=12, greedy=True,
                              prompts=[f"describe the {o.color} {o.shape}." for _, o in pairs]).texts
    model.train()
    said = [parse_caption(t) for t in texts]
    right = lambda size: [bool(s) and s[0].pos == o.pos for s, (_, o) in zip(said, pairs) if o.size == size]
    report = {f"position_{size}": float(np.mean(right(size))) for size in SIZES}
    rt.print(f"eval step {step} grounding " + " ".join(f"{k} {v:.3f}" for k, v in report.items()))
    return report


GENERATION_CATEGORIES = ("objects", "color", "shape", "size", "position", "count")


def generation_checks(detected: tuple, target: tuple) -> dict:
    """GenEval-style binary checks for one generated image against the scene it was asked for."""
    found = {(o.color, o.shape): o for o in detected}
    matched = [(o, found.get((o.color, o.shape))) for o in target]
    all_found = all(d is not None for _, d in matched)
    return {
        "overall": detected == target,
        "objects": all_found,
        "color": sorted(o.color for o in detected) == sorted(o.color for o in target),
        "shape": sorted(o.shape for o in detected) == sorted(o.shape for o in target),
        "size": all_found and all(t.size == d.size for t, d in matched),
        "position": all_found and all(t.pos == d.pos for t, d in matched),
        "count": len(detected) == len(target),
    }


def generation_report(images, targets: list[tuple]) -> dict:
    """GenEval-shapes: overall = exact scene match rate; per-category rates; the >=3-object subset."""
    checks = [generation_checks(detect_scene(img), t) for img, t in zip(images, targets, strict=True)]
    mean = lambda rows, k: sum(r[k] for r in rows) / len(rows) if rows else float("nan")
    big = [c for c, t in zip(checks, targets) if len(t) >= 3]
    return {"overall": mean(checks, "overall"), **{k: mean(checks, k) for k in GENERATION_CATEGORIES},
            "overall_3plus": mean(big, "overall")}


def mentioned_object_recall(texts: list[str], images) -> float:
    """Of the objects the captions mention (colour + shape), the fraction their images contain: does the
    decoder draw what a caption states, however little it states? Micro-averaged."""
    found = total = 0
    for text, image in zip(texts, images, strict=True):
        drawn = {(o.color, o.shape) for o in detect_scene(image)}
        mentions = [(m.color, m.shape) for m in parse_caption(text)]
        found += sum(m in drawn for m in mentions)
        total += len(mentions)
    return found / total if total else float("nan")


def caption_fidelity(texts: list[str], images) -> dict:
    """Per image, how a drawing follows a caption that may leave details out (Understanding for
    Generation on partial captions): `satisfied` = every object the caption states is drawn, with every
    size and position it states; `extra_objects` = objects drawn that the caption does not mention (the
    decoder's guesses: for a complete caption every one is wrong, for a partial one it should match what
    the caption left out)."""
    satisfied, extra = [], []
    for text, image in zip(texts, images, strict=True):
        drawn = {(o.color, o.shape): o for o in detect_scene(image)}
        mentions = parse_caption(text)
        satisfied.append(all((m.color, m.shape) in drawn and m.size in (None, drawn[(m.color, m.shape)].size)
                             and m.pos in (None, drawn[(m.color, m.shape)].pos) for m in mentions))
        extra.append(len(drawn.keys() - {(m.color, m.shape) for m in mentions}))
    return {"satisfied": satisfied, "extra_objects": extra}


def format_report(report: dict) -> str:
    """A report as one log line, `name value` per number to 3 decimals (texts, per-image dicts, None left out)."""
    return " ".join(f"{k} {v:.3f}" for k, v in report.items() if isinstance(v, (int, float)))


def scene_f1(a: tuple, b: tuple) -> float:
    """F1 between two scenes as sets of fully specified objects (pos, colour, shape, size)."""
    if not a and not b:
        return 1.0
    return 2 * len(set(a) & set(b)) / (len(a) + len(b))


# ----------------------------------------------------------------------------- tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "[UNK]"]
CHAT_TEMPLATE = (  # ChatML as in Qwen2-VL; an image content item becomes vision_start, image_pad, vision_end
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# Janus-Pro's special tokens (transformers' layout: bos, eos, pad, the image placeholder and its brackets,
# the chat roles) and its chat format "<|User|>: ...\n\n<|Assistant|>:" (the turn after the user's
# ends with eos), for the UMM-2 model (umm2.py)
JANUS_SPECIAL_TOKENS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<image_placeholder>",
                        "<begin_of_image>", "<end_of_image>", "<|User|>", "<|Assistant|>", "[UNK]"]
JANUS_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}<|User|>: {% else %}<|Assistant|>: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image_placeholder>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %}\n\n{% else %}<｜end▁of▁sentence｜>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|>:{% endif %}"
)
TOKENIZER_STYLES = {  # special tokens, named tokens and chat template of the model family the tokenizer is for
    "qwen": dict(special=SPECIAL_TOKENS, template=CHAT_TEMPLATE, extra_words=[],
                 named=dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
                 extra_special={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"}),
    "janus": dict(special=JANUS_SPECIAL_TOKENS, template=JANUS_CHAT_TEMPLATE, extra_words=[":"],
                  named=dict(bos_token=JANUS_SPECIAL_TOKENS[0], eos_token=JANUS_SPECIAL_TOKENS[1],
                             pad_token=JANUS_SPECIAL_TOKENS[2]),
                  extra_special={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                 "eoi_token": "<end_of_image>"}),
}


def vocabulary(style: str = "qwen") -> list[str]:
    """Every word the world's captions, prompt and chat roles use (fixed order: ids are stable), after the
    special tokens of the tokenizer style (TOKENIZER_STYLES)."""
    words = ["a", "at", "the", "and", ",", ".", "some", "shapes", "system", "user", "assistant", "generate"]
    words += list(SIZES) + list(COLORS) + list(SHAPES)
    words += sorted({w for p in POSITIONS for w in p.split()} | set(CAPTION_PROMPT.replace(".", " ").split()))
    spec = TOKENIZER_STYLES[style]
    return spec["special"] + list(dict.fromkeys(words + spec["extra_words"]))


def unknown_words(text: str) -> list[str]:
    """The words of a text outside the world's vocabulary, split as the world's tokenizer splits them (words and
    runs of punctuation, lowercased): its tokenizer would read each as [UNK], the oracle ignores them."""
    known = set(vocabulary())
    return [w for w in re.findall(r"\w+|[^\w\s]+", text.lower()) if w not in known]


def build_tokenizer(style: str = "qwen"):
    """A word-level `PreTrainedTokenizerFast` with the special tokens and chat template of Qwen2.5-VL (the
    UAE's encoder) or of Janus-Pro (UMM-2), so the tiny models run through the same processor code as the
    real ones. Janus's tokenizer starts every text with its bos token, as the real (Llama) one does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if style not in TOKENIZER_STYLES:
        raise ValueError(f"tokenizer style must be one of {sorted(TOKENIZER_STYLES)}, got {style!r}")
    spec = TOKENIZER_STYLES[style]
    vocab = {w: i for i, w in enumerate(vocabulary(style))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation; newlines vanish
    core.decoder = decoders.WordPiece(cleanup=True)  # join with spaces, then "a ." -> "a."
    core.add_special_tokens(spec["special"])  # matched whole, before pre-tokenization
    bos = spec["named"].get("bos_token")
    if bos:
        core.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, vocab[bos])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", **spec["named"],
                                        extra_special_tokens=spec["extra_special"])
    tokenizer.chat_template = spec["template"]
    return tokenizer


def main(argv=None):
    """Check the oracles on fresh scenes (and the short-caption statistics of a prepared train split):
        python shapes.py --n=2000 --train=data/shapes/train.jsonl"""
    import json
    import sys
    from configurator import configure
    cfg = configure({"n": 2000, "seed": 2026, "noise": 8.0, "train": ""}, argv if argv is not None else sys.argv[1:])
    rng, noise = random.Random(cfg.seed), np.random.default_rng(cfg.seed)
    hits = {"detect": 0, "parse": 0, "detect_noisy": 0}
    for _ in range(cfg.n):
        scene = sample_scene(rng)
        image = render(scene)
        hits["detect"] += detect_scene(image) == scene
        hits["parse"] += parse_caption(long_caption(scene)) == scene
        noisy = np.clip(image + noise.normal(0, cfg.noise, image.shape), 0, 255).astype(np.uint8)
        hits["detect_noisy"] += detect_scene(noisy) == scene
    print(f"{cfg.n} fresh scenes: " + ", ".join(f"{k} exact {v / cfg.n:.4f}" for k, v in hits.items())
          + f" (noise sigma {cfg.noise:g}/255)")
    if cfg.train:
        mentioned = {"large": [0, 0], "small": [0, 0]}
        for line in open(cfg.train):
            record = json.loads(line)
            said = {(o.color, o.shape) for o in parse_caption(record["short_caption"])}
            for o in scene_from_json(record["scene"]):
                mentioned[o.size][0] += (o.color, o.shape) in said
                mentioned[o.size][1] += 1
        print("short-caption mention rate: " + ", ".join(f"{k} {a / b:.4f}" for k, (a, b) in mentioned.items()))


if __name__ == "__main__":
    main()
