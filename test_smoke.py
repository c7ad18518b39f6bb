"""The test suite: real behaviour at tiny sizes, on the CPU, in a few minutes.

    python -m pytest -q test_smoke.py
"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, ever
REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import shapes  # noqa: E402
from configurator import ConfigError, configure  # noqa: E402
from data import DataError, load_image, load_images, read_jsonl  # noqa: E402


# ----------------------------------------------------------------------------- the shapes world

def test_oracles_exact_on_fresh_scenes_and_robust_to_noise():
    rng, noise = random.Random(123), np.random.default_rng(0)
    scenes = [shapes.sample_scene(rng) for _ in range(300)] + [shapes.sample_scene(rng, 5, 5) for _ in range(20)]
    for scene in scenes:
        image = shapes.render(scene)
        assert shapes.detect_scene(image) == scene
        assert shapes.parse_caption(shapes.long_caption(scene)) == scene
        noisy = np.clip(image + noise.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
        assert shapes.detect_scene(noisy) == scene
    nine = shapes.sample_scene(rng, 9, 9)
    assert len(nine) == 9 and shapes.detect_scene(shapes.render(nine)) == nine


def test_a_five_object_scene_by_hand():
    O = shapes.Obj
    scene = shapes.canonical([O("top left", "red", "circle", "large", 2, -1), O("top right", "blue", "square", "small", -2, 0),
                              O("center", "green", "triangle", "small", 0, 2), O("bottom left", "yellow", "square", "large"),
                              O("bottom right", "red", "triangle", "large", 1, 1)])
    caption = shapes.long_caption(scene)
    assert caption == ("a large red circle at the top left, a small blue square at the top right, a small green triangle "
                       "at the center, a large yellow square at the bottom left and a large red triangle at the bottom right.")
    assert shapes.parse_caption(caption) == scene
    assert shapes.detect_scene(shapes.render(scene)) == scene
    # the float (3, H, W) tensor form that generators produce reads the same
    assert shapes.detect_scene(torch.from_numpy(shapes.render(scene)).permute(2, 0, 1) / 255) == scene


def test_metrics_by_hand():
    O = shapes.Obj
    scene = shapes.canonical([O("top left", "red", "circle", "large"), O("center", "blue", "square", "small"),
                              O("bottom", "green", "triangle", "large")])
    # mentions: red circle (right size, wrong position), green triangle (no attributes), a hallucinated cyan circle
    report = shapes.caption_report(["a large red circle at the top, a green triangle and a cyan circle."], [scene])
    assert report["recall"] == pytest.approx(2 / 3) and report["small_object_recall"] == 0.0
    assert report["precision"] == pytest.approx(2 / 3) and report["attribute_accuracy"] == pytest.approx(1 / 2)
    assert report["caption_length"] == 14
    missing_small = scene[:1] + scene[2:]
    checks = shapes.generation_checks(missing_small, scene)
    assert checks == {"overall": False, "objects": False, "color": False, "shape": False, "size": False,
                      "position": False, "count": False}
    moved = (shapes.Obj("top", "red", "circle", "large"),) + scene[1:]
    checks = shapes.generation_checks(shapes.canonical(moved), scene)
    assert checks["objects"] and checks["size"] and checks["count"] and not checks["position"] and not checks["overall"]
    assert shapes.scene_f1(scene, missing_small) == pytest.approx(2 * 2 / 5)
    images = [shapes.render(scene), shapes.render(shapes.canonical(moved))]
    gen = shapes.generation_report(images, [scene, scene])
    assert gen["overall"] == 0.5 and gen["position"] == 0.5 and gen["count"] == 1.0 and gen["overall_3plus"] == 0.5


def test_short_captions_under_describe_small_objects():
    rng = random.Random(0)
    mentioned = {"large": [0, 0], "small": [0, 0]}
    for _ in range(3000):
        scene = shapes.sample_scene(rng)
        said = {(o.color, o.shape) for o in shapes.parse_caption(shapes.short_caption(scene, rng))}
        for o in scene:
            mentioned[o.size][0] += (o.color, o.shape) in said
            mentioned[o.size][1] += 1
    assert abs(mentioned["small"][0] / mentioned["small"][1] - 0.1) < 0.02
    assert abs(mentioned["large"][0] / mentioned["large"][1] - 0.7) < 0.03


def test_tokenizer_round_trip_chat_template_and_processor(tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    shapes.build_tokenizer().save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").exists()
    tok = PreTrainedTokenizerFast.from_pretrained(tmp_path)
    assert type(AutoTokenizer.from_pretrained(tmp_path)).__name__ in ("PreTrainedTokenizerFast", "TokenizersBackend")
    scene = shapes.sample_scene(random.Random(5), 4, 4)
    for text in (shapes.long_caption(scene), "some shapes.", "a red circle and a blue square."):
        assert tok.decode(tok(text)["input_ids"]) == text
    assert tok("a purple zebra")["input_ids"][-1] == tok.unk_token_id
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": shapes.CAPTION_PROMPT}]}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>describe this image in detail."
                      "<|im_end|>\n<|im_start|>assistant\n")
    ids = tok(prompt)["input_ids"]
    assert ids[:3] == tok.convert_tokens_to_ids(["<|im_start|>", "user", "<|vision_start|>"])
    assert tok.image_token == "<|image_pad|>" and tok.eos_token == "<|im_end|>"
    # the real Qwen2.5-VL processor accepts it and expands the image pad to the image's token count
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64, max_pixels=64 * 64)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=shapes.CHAT_TEMPLATE)
    batch = processor(text=[prompt], images=[shapes.render(scene)], return_tensors="pt")
    assert (batch["input_ids"] == tok.image_token_id).sum() == (64 // 8) ** 2 // 4


# ----------------------------------------------------------------------------- configurator

def test_configurator_types_files_and_errors(tmp_path):
    defaults = {"lr": 1e-3, "steps": 10, "name": "run", "compile": False, "betas": (0.9, 0.95), "init_from": None}
    cfg = configure(defaults, ["--lr=1", "--steps=20", "--name=out/x", "--compile=True", "--betas=(0.8,0.9)"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.steps == 20 and cfg.name == "out/x"
    assert cfg.compile is True and cfg.betas == (0.8, 0.9) and cfg.init_from is None
    path = tmp_path / "cfg.py"
    path.write_text("import math\nsteps = 7\nlr = math.pi\n")
    cfg = configure(defaults, [str(path), "--steps=8"])
    assert cfg.steps == 8 and cfg.lr == pytest.approx(3.14159, rel=1e-5)
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'.*Valid keys: betas, compile, init_from, lr, name, steps"):
        configure(defaults, ["--stepz=3"])
    with pytest.raises(ConfigError, match=r"'steps' expects int.*got float"):
        configure(defaults, ["--steps=2.5"])
    with pytest.raises(ConfigError, match=r"'compile' expects bool"):
        configure(defaults, ["--compile=1"])
    path.write_text("batch = 3\n")
    with pytest.raises(ConfigError, match=r"cfg.py: unknown config key 'batch'"):
        configure(defaults, [str(path)])
    with pytest.raises(ConfigError, match="must look like --key=value"):
        configure(defaults, ["--steps"])


# ----------------------------------------------------------------------------- data

def _write_dataset(root, n=3):
    from PIL import Image
    os.makedirs(root / "images", exist_ok=True)
    rng, lines = random.Random(0), []
    for i in range(n):
        scene = shapes.sample_scene(rng)
        Image.fromarray(shapes.render(scene)).save(root / "images" / f"{i}.png")
        lines.append(json.dumps({"image": f"images/{i}.png", "caption": shapes.long_caption(scene)}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    return lines


def test_jsonl_reading_and_clear_errors(tmp_path):
    lines = _write_dataset(tmp_path)
    records = read_jsonl(str(tmp_path / "train.jsonl"))
    assert len(records) == 3 and load_images(records).shape == (3, 3, 64, 64)
    (tmp_path / "images" / "1.png").unlink()
    with pytest.raises(DataError, match=r"train.jsonl:2: cannot read image .*1.png"):
        load_images(read_jsonl(str(tmp_path / "train.jsonl")))
    (tmp_path / "images" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(DataError, match=r"train.jsonl:2: cannot read image .*1.png"):
        load_image(read_jsonl(str(tmp_path / "train.jsonl"))[1])
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: invalid JSON"):
        read_jsonl(str(tmp_path / "bad.jsonl"))
    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"image": "images/0.png", "caption": " "}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: missing or empty \"caption\""):
        read_jsonl(str(tmp_path / "bad.jsonl"))
    with pytest.raises(DataError, match=r"nope.jsonl: no such dataset file"):
        read_jsonl(str(tmp_path / "nope.jsonl"))


def test_prepare_runs_small_and_is_deterministic(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "data", "shapes", "prepare.py"), "--n_train=64", "--n_val=32",
           "--n_bench=8", "--clip_steps=3", "--clip_batch=16", "--clip_eval_n=32"]
    for out in ("a", "b"):
        subprocess.run(cmd + [f"--out_dir={tmp_path / out}"], check=True, capture_output=True, cwd=tmp_path)
    for split in ("train", "val", "bench"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (tmp_path / "b" / f"{split}.jsonl").read_text()
    records = read_jsonl(str(tmp_path / "a" / "bench.jsonl"))
    assert len(records) == 8
    for r in records:
        scene = shapes.scene_from_json(r["scene"])
        assert shapes.detect_scene(load_image(r)) == scene and shapes.parse_caption(r["caption"]) == scene
    report = json.loads((tmp_path / "a" / "shapes_clip_eval.json").read_text())
    assert report["steps"] == 3 and 0.0 <= report["i2t_r1"] <= 1.0
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").exists() and (tmp_path / "a" / "shapes_clip.pt").exists()
