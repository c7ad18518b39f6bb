"""The test suite: real behaviour at tiny sizes, on the CPU, in a few minutes.

    python -m pytest -q test_smoke.py
"""
import json
import math
import os
import random
import re
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, ever
REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import shapes  # noqa: E402
from configurator import ConfigError, configure  # noqa: E402
import reward  # noqa: E402
from data import DataError, load_image, load_images, read_jsonl, read_records  # noqa: E402
from reward import ReconstructionReward, cosine, group_advantages, load_backbone  # noqa: E402


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


def test_mentioned_object_recall_by_hand():
    drawn = shapes.render((shapes.Obj("top left", "red", "circle", "large"), shapes.Obj("center", "blue", "square", "small")))
    empty = shapes.render(())
    # 2 of 3 mentions drawn in the first image (the green one is not; position is not asked), 0 of 1 in the second
    texts = ["a red circle at the bottom, a blue square and a green triangle.", "a red circle."]
    assert shapes.mentioned_object_recall(texts, [drawn, empty]) == pytest.approx(2 / 4)
    assert math.isnan(shapes.mentioned_object_recall(["some shapes."], [drawn]))  # nothing mentioned


def test_caption_fidelity_by_hand():
    drawn = shapes.render((shapes.Obj("top left", "red", "circle", "large"), shapes.Obj("center", "blue", "square", "small")))
    texts = ["a red circle at the top left.",  # satisfied; the blue square is an extra
             "a large red circle and a small blue square at the center.",  # satisfied, nothing extra
             "a small red circle.",  # wrong size
             "a red circle at the top left and a green triangle."]  # the green triangle is missing
    report = shapes.caption_fidelity(texts, [drawn] * 4)
    assert report == {"satisfied": [True, True, False, False], "extra_objects": [1, 0, 1, 1]}


def test_split_check_finds_a_shared_scene_up_to_jitter():
    rng = random.Random(0)
    train = [shapes.sample_scene(rng) for _ in range(200)]
    taken = {shapes.scene_key(s) for s in train}
    val = shapes.sample_disjoint(rng, 50, taken, 2, 4)
    assert shapes.check_disjoint({"train": train, "val": val}) == {"train&val": 0, "val repeats": 0}
    leaked = shapes.rejitter(train[3], random.Random(1))  # the same scene, other jitter: still the same scene
    with pytest.raises(ValueError, match="train&val"):
        shapes.check_disjoint({"train": train, "val": val + [leaked]})
    with pytest.raises(ValueError, match="val repeats"):
        shapes.check_disjoint({"train": train, "val": val + [shapes.rejitter(val[0], random.Random(2))]})


def test_text_window_fits_six_objects_and_refuses_longer(tiny_world):
    import pretrain_decoder
    model = M.UAE.load(str(tiny_world / "enc"))
    model.max_text_tokens = pretrain_decoder.config["max_text_tokens"]
    six, seven = shapes.longest_long_caption(shapes.WINDOW_OBJECTS), shapes.longest_long_caption(7)
    assert model.turn_lengths([six]) == [55] and model.turn_lengths([six])[0] <= model.max_text_tokens
    assert model.text_tokens([six, "a red circle."])["input_ids"].shape == (2, model.max_text_tokens)
    with pytest.raises(ValueError, match="1 of 2 captions exceed the decoder's window of max_text_tokens=56"):
        model.text_tokens([seven, six])  # 63 tokens: an error, never cut
    # a generated caption, even one stopped by the cap, fits the window with its closing token
    cap = model.caption_cap(0)
    assert cap + model.generate_prefix_tokens() + 1 == model.max_text_tokens
    stopped = " ".join(["red"] * cap)
    assert model.turn_lengths([stopped]) == [model.max_text_tokens] and model.captions_cut([stopped, six]) == 1
    # training captions longer than the window: an error naming the file and line
    records = [{"caption": six, "where": "x.jsonl:1"}, {"caption": seven, "where": "x.jsonl:2"}]
    with pytest.raises(ValueError, match="x.jsonl:2.*63 tokens"):
        pretrain_decoder.corpus(model, records, {"caption": 1.0})


def test_pads_carry_no_text(tiny_world):
    """The decoder reads a caption's tokens only: its pads are exact zeros, which project() maps to the
    position embedding alone, and the text statistics are those of the caption tokens."""
    import types
    import pretrain_decoder
    model = M.UAE.load(str(tiny_world / "dec")).eval()
    texts = ["a red circle.", "a large blue square at the top left and a small green triangle."]
    with torch.no_grad():
        n = model.text_tokens(texts)["attention_mask"].sum(1).tolist()
        hidden, cond = model.text_hidden_states(texts), model.condition(texts)
    assert n[0] < n[1] < model.max_text_tokens
    assert (hidden[0, n[0]:] == 0).all() and (hidden[0, :n[0]].abs().amax(-1) > 0).all()
    assert torch.equal(cond[0, n[1]:], cond[1, n[1]:]) and not torch.allclose(cond[0, :n[0]], cond[1, :n[0]])
    states = torch.zeros(2, 3, hidden.shape[-1])
    states[0, :2], states[1, :1] = torch.randn(2, hidden.shape[-1]), torch.randn(1, hidden.shape[-1])
    tokens = torch.cat([states[0, :2], states[1, :1]])
    pretrain_decoder.set_text_stats(model, types.SimpleNamespace(print=lambda *a: None), states)
    assert torch.allclose(model.text_shift, tokens.mean(0)) and torch.allclose(model.text_scale, 1 / tokens.std(0))


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


def test_object_questions_by_hand():
    scene = shapes.canonical([shapes.Obj("top left", "red", "circle", "small"), shapes.Obj("center", "blue", "square", "large")])
    assert shapes.object_question(scene, 0) == ("describe the red circle.", "a small red circle at the top left.")
    assert shapes.object_question(scene, 1) == ("describe the blue square.", "a large blue square at the center.")
    assert shapes.object_question(scene, 2) == ("describe the top left.", "a small red circle.")
    assert shapes.object_question(scene, 7) == ("describe the center.", "a large blue square.")
    tok = shapes.build_tokenizer()  # every question is in the world's words
    assert tok.unk_token_id not in tok("describe the bottom right. describe the purple triangle.")["input_ids"]


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
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=shapes.CANVAS ** 2, max_pixels=shapes.CANVAS ** 2)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=shapes.CHAT_TEMPLATE)
    batch = processor(text=[prompt], images=[shapes.render(scene)], return_tensors="pt")
    assert (batch["input_ids"] == tok.image_token_id).sum() == (shapes.CANVAS // 8) ** 2 // 4


# ----------------------------------------------------------------------------- configurator

def test_configurator_types_files_and_errors(tmp_path):
    defaults = {"lr": 1e-3, "steps": 10, "name": "run", "compile": False, "betas": (0.9, 0.95)}
    cfg = configure(defaults, ["--lr=1", "--steps=20", "--name=out/x", "--compile=True", "--betas=(0.8,0.9)"])
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.steps == 20 and cfg.name == "out/x"
    assert cfg.compile is True and cfg.betas == (0.8, 0.9)
    assert configure(defaults, ["--name=1"]).name == "1"  # a string key takes its value as written
    path = tmp_path / "cfg.py"
    path.write_text("import math\nsteps = 7\nlr = math.pi\n")
    cfg = configure(defaults, [str(path), "--steps=8"])
    assert cfg.steps == 8 and cfg.lr == pytest.approx(3.14159, rel=1e-5)
    with pytest.raises(ConfigError, match=r"unknown config key 'stepz'.*Valid keys: betas, compile, lr, name, steps"):
        configure(defaults, ["--stepz=3"])
    with pytest.raises(ConfigError, match=r"'steps' expects int.*got float"):
        configure(defaults, ["--steps=2.5"])
    with pytest.raises(ConfigError, match=r"'compile' expects bool"):
        configure(defaults, ["--compile=1"])
    with pytest.raises(ConfigError, match=r"'lr' expects float.*got NoneType"):
        configure(defaults, ["--lr=None"])
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
    assert len(records) == 3 and load_images(records).shape == (3, 3, shapes.CANVAS, shapes.CANVAS)
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
    (tmp_path / "nocap.jsonl").write_text(json.dumps({"image": "images/0.png"}) + "\n")  # a stage that needs no caption
    with pytest.raises(DataError, match=r"nocap.jsonl:1: missing or empty \"caption\""):
        read_jsonl(str(tmp_path / "nocap.jsonl"))
    assert read_jsonl(str(tmp_path / "nocap.jsonl"), need_caption=False)[0]["image"] == "images/0.png"


def test_images_of_any_size_and_mode_become_square_rgb(tmp_path):
    from PIL import Image
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, 10:30] = 255  # a white band in the middle 20 columns: the centre crop of a 2:1 image
    Image.fromarray(wide).save(tmp_path / "a_wide.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0], rgba[:4, :, 3] = 200, 255  # top half opaque red-ish, bottom half fully transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "b_rgba.png")
    Image.fromarray(np.full((10, 10), 77, np.uint8), "L").save(tmp_path / "c_grey.jpg", quality=100)
    Image.fromarray(np.full((6, 6, 3), 9, np.uint8)).convert("P").save(tmp_path / "d_palette.png")
    (tmp_path / "notes.txt").write_text("not an image")
    records = read_records(str(tmp_path), need_caption=False)
    assert [r["image"] for r in records] == ["a_wide.png", "b_rgba.png", "c_grey.jpg", "d_palette.png"]
    with pytest.raises(DataError, match=r"b_rgba.png: image .* is 8x8, the batch's first 40x20: set image_size"):
        load_images(records)
    batch = load_images(records, size=4)
    assert batch.shape == (4, 3, 4, 4) and batch.dtype == torch.uint8
    assert (load_image(records[0], size=20) == 255).all()  # the centre crop of the 40x20 image is exactly the band
    rgba_loaded = load_image(records[1])
    assert (rgba_loaded[:4] == [200, 0, 0]).all() and (rgba_loaded[4:] == 255).all()  # transparency over white
    assert (np.abs(load_image(records[2]).astype(int) - 77) <= 1).all() 
    assert (load_image(records[3]) == np.asarray(Image.open(tmp_path / "d_palette.png").convert("RGB"))).all()
    with pytest.raises(DataError, match=r"a folder of images has no captions"):
        read_records(str(tmp_path))


def test_prepare_runs_small_and_is_deterministic(tmp_path):
    cmd = [sys.executable, os.path.join(REPO, "data", "shapes", "prepare.py"), "--n_train=64", "--n_val=32",
           "--n_test=24", "--n_bench=8", "--clip_steps=3", "--clip_batch=16", "--clip_eval_n=32", "--judge_steps=2",
           "--dino_steps=2", "--judge_batch=8"]
    for out in ("a", "b"):
        subprocess.run(cmd + [f"--out_dir={tmp_path / out}"], check=True, capture_output=True, cwd=tmp_path)
    for split in ("train", "val", "test", "bench"):
        assert (tmp_path / "a" / f"{split}.jsonl").read_text() == (tmp_path / "b" / f"{split}.jsonl").read_text()
    records = read_jsonl(str(tmp_path / "a" / "bench.jsonl"))
    assert len(records) == 8
    for r in records:
        scene = shapes.scene_from_json(r["scene"])
        assert shapes.detect_scene(load_image(r)) == scene and shapes.parse_caption(r["caption"]) == scene
        partial = shapes.parse_caption(r["partial_caption"])  # what a partial caption states is true
        truth = {(o.color, o.shape): o for o in scene}
        assert all(o.size in (None, truth[(o.color, o.shape)].size) and o.pos in (None, truth[(o.color, o.shape)].pos)
                   for o in partial)
        assert {(o.color, o.shape) for o in scene if o.size == "large"} <= {(o.color, o.shape) for o in partial}
    splits = {s: [shapes.scene_from_json(r["scene"]) for r in read_jsonl(str(tmp_path / "a" / f"{s}.jsonl"))]
              for s in ("train", "val", "test", "bench")}
    assert set(shapes.check_disjoint(splits).values()) == {0}
    report = json.loads((tmp_path / "a" / "shapes_clip_eval.json").read_text())
    assert report["splits"] == {"train": 64, "val": 32, "test": 24, "bench": 8}
    assert set(report["judges"]) == {"clip", "longclip", "dinov2"} and "i2t_r1" not in report["judges"]["dinov2"]
    for r in [report["reward"]] + list(report["judges"].values()):
        assert 0.0 <= r["sensitivity_drop"] <= 1.0 and 0.0 <= r["sensitivity_move"] <= 1.0
    assert report["reward"]["steps"] == 3 and report["judges"]["clip"]["steps"] == 2
    for judge in ("clip", "dinov2"):  # the judges load as the real ones do: transformers directories
        assert load_backbone(f"hf:{tmp_path / 'a' / 'judges' / judge}", "cpu")(torch.rand(2, 3, 48, 48)).shape[0] == 2
    assert load_backbone(f"open_clip:ShapesLongCLIP:{tmp_path / 'a' / 'judges' / 'longclip.pt'}", "cpu")
    # the hard negatives: the same scene but for one edit of one object, still a valid scene
    sys.path.insert(0, os.path.join(REPO, "data", "shapes"))
    import prepare
    rng = random.Random(0)
    for _ in range(50):
        scene = shapes.sample_scene(rng, 2, 4)
        for edit in prepare.HARD_NEGATIVES:
            negative = prepare.edit_one(scene, rng, edit)
            assert negative == shapes.canonical(negative) and len({o.pos for o in negative}) == len(negative)
            assert len({(o.color, o.shape) for o in negative}) == len(negative)
            if edit == "drop":
                assert len(negative) == len(scene) - 1 and set(negative) < set(scene)
                continue
            (new,), (old,) = set(negative) - set(scene), set(scene) - set(negative)
            field = {"move": "pos", "recolor": "color", "reshape": "shape", "resize": "size"}[edit]
            changed = [f for f in ("pos", "color", "shape", "size") if getattr(new, f) != getattr(old, f)]
            assert changed in ([field], ["size"])  # size is the fallback where no colour / shape is free
    assert (tmp_path / "a" / "tokenizer" / "tokenizer.json").exists() and (tmp_path / "a" / "shapes_clip.pt").exists()


# ----------------------------------------------------------------------------- reward.py: 
def test_cosine_by_hand():
    a = torch.tensor([[1.0, 0.0], [3.0, 4.0], [1.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [3.0, 4.0], [-2.0, -4.0]])
    got = cosine(a, b.double())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, torch.tensor([1 / math.sqrt(2), 1.0, -1.0]))
    with pytest.raises(ValueError, match="equal shape"):
        cosine(a, b[:2])


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.5, 0.5, 0.5], dtype=torch.float64)
    adv = group_advantages(rewards, 3)
    std = math.sqrt(2 / 3)  # population std of [1, 2, 3]
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv[:3], torch.tensor([-1 / (std + 1e-4), 0.0, 1 / (std + 1e-4)]))
    assert torch.equal(adv[3:], torch.zeros(3))  # exactly zero, not NaN, not noise
    # eight 0.7s: the fp32 mean is off by an ulp, so the bare formula gives ~6e-4 noise, not 0
    flat = torch.full((8,), 0.7)
    assert ((flat - flat.mean()) / (flat.std(correction=0) + 1e-4)).abs().max() > 1e-4
    assert torch.equal(group_advantages(flat, 8), torch.zeros(8))
    assert torch.equal(group_advantages(torch.tensor([7.0]), 1), torch.zeros(1))
    # batch std (Flow-GRPO's global_std): one std over all six rewards, group means as before
    batch_std = rewards.float().std(correction=0).item()
    torch.testing.assert_close(group_advantages(rewards, 3, "batch")[:3],
                               torch.tensor([-1.0, 0.0, 1.0]) / (batch_std + 1e-4))
    assert torch.equal(group_advantages(rewards, 3, "batch")[3:], torch.zeros(3))
    with pytest.raises(ValueError, match="std_over"):
        group_advantages(rewards, 3, "global")
    for bad, size in ((torch.zeros(5), 3), (torch.zeros(2, 3), 3), (torch.zeros(3), 0)):
        with pytest.raises(ValueError, match="divisible"):
            group_advantages(bad, size)


# ----------------------------------------------------------------------------- open_clip backbones

@pytest.fixture(scope="module")
def shapes_clip():
    import open_clip
    open_clip.add_model_config(os.path.join(REPO, "config", "open_clip"))
    torch.manual_seed(0)
    return open_clip.create_model("ShapesCLIP", pretrained_text=False).eval()


@pytest.fixture(scope="module")
def shapes_clip_file(shapes_clip, tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "shapes_clip.pt"
    torch.save(shapes_clip.state_dict(), path)
    return str(path)


def reference_clip(model, images):
    from open_clip.transform import PreprocessCfg, image_transform_v2
    transform = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.no_grad():
        return F.normalize(model.encode_image(torch.stack([transform(im) for im in images])), dim=-1)


def test_open_clip_backbone_matches_encode_image(shapes_clip, shapes_clip_file):
    backbone = load_backbone(f"open_clip:ShapesCLIP:{shapes_clip_file}", device="cpu")
    assert backbone.name == f"open_clip:ShapesCLIP:{shapes_clip_file}" and backbone.device.type == "cpu"
    assert not backbone.training and not any(p.requires_grad for p in backbone.parameters())
    backbone.train()  # a parent's .train() must not unfreeze dropout-like behaviour
    assert not backbone.training
    torch.manual_seed(1)
    for size in ((shapes.CANVAS, shapes.CANVAS), (50, 90), (150, 90)):  # native, upsampled, downsampled + cropped
        images = torch.rand(3, 3, *size)
        feats = backbone(images)
        assert feats.shape == (3, 128) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
        # open_clip's own torchvision transform + encode_image on the same tensor
        torch.testing.assert_close(feats, reference_clip(shapes_clip, images), atol=1e-5, rtol=1e-5)
    u8 = [(im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy() for im in images]  # the scoring path's input
    torch.testing.assert_close(backbone.features(u8, batch_size=2), backbone(torch.from_numpy(np.stack(u8)).permute(0, 3, 1, 2) / 255))
    assert not backbone.features(u8).requires_grad


def test_open_clip_backbone_is_differentiable_wrt_pixels(shapes_clip_file):
    backbone = load_backbone(f"open_clip:ShapesCLIP:{shapes_clip_file}", device="cpu")
    images = torch.rand(2, 3, 80, 72, requires_grad=True)
    target = backbone(torch.rand(2, 3, 64, 64)).detach()
    cosine(backbone(images), target).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit.*deprecated:FutureWarning")
def test_open_clip_longclip_style_and_torchscript_checkpoints(shapes_clip, tmp_path):
    images = torch.rand(2, 3, 64, 64)
    expected = reference_clip(shapes_clip, images)
    # LongCLIP-L layout: OpenAI key names, 248 text positions and an extra positional_embedding_res;
    # a strict full load rejects it, the image tower is untouched by the difference
    state = dict(shapes_clip.state_dict())
    width = state["positional_embedding"].shape[1]
    state["positional_embedding"] = torch.randn(248, width).half()
    state["positional_embedding_res"] = torch.randn(248, width).half()
    state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}  # as released
    torch.save(state, tmp_path / "longclip.pt")
    backbone = load_backbone(f"open_clip:ShapesCLIP:{tmp_path / 'longclip.pt'}", device="cpu")
    torch.testing.assert_close(backbone(images), expected, atol=2e-3, rtol=0)  # fp16 weights
    # OpenAI's original releases are TorchScript archives (torch.load refuses them with weights_only)
    holder = torch.nn.Module()
    holder.visual = shapes_clip.visual
    holder.forward = lambda x: holder.visual(x)
    with warnings.catch_warnings():  # tracing is only our way to produce such an archive
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(holder, torch.rand(1, 3, shapes.CANVAS, shapes.CANVAS), check_trace=False)
    torch.jit.save(traced, tmp_path / "openai.pt")
    backbone = load_backbone(f"open_clip:ShapesCLIP:{tmp_path / 'openai.pt'}", device="cpu")
    torch.testing.assert_close(backbone(images), expected, atol=1e-5, rtol=1e-5)
    # a checkpoint whose image tower does not fit the named architecture is an error, not random init
    torch.save({k: v for k, v in state.items() if k != "visual.proj"}, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="proj"):
        load_backbone(f"open_clip:ShapesCLIP:{tmp_path / 'broken.pt'}", device="cpu")


# ----------------------------------------------------------------------------- transformers CLIP / DINOv2 / DINOv3

def save_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    torch.manual_seed(0)
    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    model.save_pretrained(path)
    processor = CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    return model, processor


def save_dinov2(path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          patch_size=8, image_size=32)
    model = Dinov2Model(config).eval()
    model.save_pretrained(path)
    processor = BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                  image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    processor.save_pretrained(path)
    return model, processor


def save_dinov3(path):
    from transformers import DINOv3ViTConfig, DINOv3ViTImageProcessor, DINOv3ViTModel
    torch.manual_seed(0)
    config = DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             patch_size=8, image_size=32, num_register_tokens=2)
    model = DINOv3ViTModel(config).eval()
    model.save_pretrained(path)
    processor = DINOv3ViTImageProcessor(size={"height": 32, "width": 32})
    processor.save_pretrained(path)
    return model, processor


def manual_preprocess(images, resize, crop, mode, mean, std):
    """The processors' recipe spelled out: resize (shortest side or exact), center crop, normalise."""
    out = []
    for im in images:
        h, w = im.shape[-2:]
        if isinstance(resize, int):
            s = resize / min(h, w)
            resize_hw = (resize, int(w * s)) if h <= w else (int(h * s), resize)
        else:
            resize_hw = resize
        im = F.interpolate(im[None], size=resize_hw, mode=mode, antialias=True, align_corners=False)[0]
        if crop:
            top, left = (resize_hw[0] - crop[0]) // 2, (resize_hw[1] - crop[1]) // 2
            im = im[:, top:top + crop[0], left:left + crop[1]]
        out.append((im - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])
    return torch.stack(out)


@pytest.mark.parametrize("family", ["clip", "dinov2", "dinov3"])
def test_hf_backbone_forward_matches_the_model(family, tmp_path):
    save = {"clip": save_clip, "dinov2": save_dinov2, "dinov3": save_dinov3}[family]
    model, processor = save(tmp_path)
    backbone = load_backbone(f"hf:{tmp_path}", device="cpu")
    assert not any(p.requires_grad for p in backbone.parameters())
    torch.manual_seed(1)
    images = torch.rand(3, 3, 70, 50, requires_grad=True)
    if family in ("clip", "dinov2"):  # shortest side 40 (bicubic), center crop 32
        pixels = manual_preprocess(images.detach(), 40, (32, 32), "bicubic", processor.image_mean, processor.image_std)
    else:  # DINOv3 resizes straight to 32x32 (bilinear), no crop
        pixels = manual_preprocess(images.detach(), (32, 32), None, "bilinear", processor.image_mean, processor.image_std)
    # ... which is also what the transformers processor itself produces (it expects [0, 255])
    torch.testing.assert_close(processor(images=list(images.detach() * 255), return_tensors="pt").pixel_values,
                               pixels, atol=1e-5, rtol=1e-5)
    feats = backbone(images)
    with torch.no_grad():  # CLIP: the projected image features; DINO: the CLS token after the final norm
        out = model.get_image_features(pixel_values=pixels) if family == "clip" else model(pixel_values=pixels)
        expected = F.normalize(out.pooler_output if family == "clip" else out.last_hidden_state[:, 0], dim=-1)
    assert feats.shape == (3, 16 if family == "clip" else 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    feats.sum().backward()
    assert images.grad.abs().sum() > 0


def test_hf_rejects_other_model_types(tmp_path):
    from transformers import ViTConfig, ViTModel
    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                       patch_size=8, image_size=32)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="model_type 'vit'"):
        load_backbone(f"hf:{tmp_path}", device="cpu")


# ----------------------------------------------------------------------------- specs

def test_bad_specs_and_missing_paths(tmp_path):
    for spec in ("clip:ViT-L-14", "open_clip:ShapesCLIP", "open_clip::/x.pt", "hf:", "dinov2", ""):
        with pytest.raises(ValueError, match="valid forms: 'open_clip:<model_name>:<checkpoint_file>' or 'hf:<local_dir>'"):
            load_backbone(spec)
    missing = str(tmp_path / "nope.pt")
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        load_backbone(f"open_clip:ShapesCLIP:{missing}")
    with pytest.raises(FileNotFoundError, match="no_such_dir"):
        load_backbone(f"hf:{tmp_path / 'no_such_dir'}")


# ----------------------------------------------------------------------------- reconstruction reward

class Counting(torch.nn.Module):
    """Wraps a backbone, recording how many images each call embeds."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.calls = backbone, []

    def forward(self, images):
        self.calls.append(len(images))
        return self.backbone(images)


def test_reconstruction_reward_and_source_cache(shapes_clip_file):
    backbone = Counting(load_backbone(f"open_clip:ShapesCLIP:{shapes_clip_file}", device="cpu"))
    rr = ReconstructionReward(backbone)
    torch.manual_seed(0)
    sources = torch.rand(2, 3, 64, 64)
    x = sources.repeat_interleave(3, dim=0)  # 2 groups of 3, as in GRPO
    keys = ["a", "a", "a", "b", "b", "b"]
    torch.testing.assert_close(rr.reconstruction_reward(x, x.clone(), keys), torch.ones(6))
    assert backbone.calls == [2, 6]  # each distinct source embedded once, then all of x_hat

    x_hat = (x + 0.3 * torch.randn_like(x)).clamp(0, 1).requires_grad_(True)
    backbone.calls.clear()
    r = rr.reconstruction_reward(x, x_hat, keys)
    assert backbone.calls == [6]  # sources came from the cache
    assert r.shape == (6,) and r.dtype == torch.float32 and (r < 1).all()
    # same numbers as the uncached module-level function, and gradients reach x_hat only
    torch.testing.assert_close(r, reward.reconstruction_reward(x, x_hat, backbone))
    r.sum().backward()
    assert x_hat.grad.abs().sum() > 0
    assert not rr.cache["a"].requires_grad

    backbone.calls.clear()
    rr.reconstruction_reward(x[:2], x_hat[:2].detach(), ["c", "a"])
    assert backbone.calls == [1, 2]  # only the new key "c"
    with pytest.raises(ValueError, match="3 keys for 2 images"):
        rr.reconstruction_reward(x[:2], x_hat[:2], ["a", "b", "c"])


# ----------------------------------------------------------------------------- model.py, grpo.py and lora.py: LoRA, samplers, log-probs

from captioner import LLM_LORA_TARGETS, PAPER_CAPTION_PROMPT, Captions, checkpoint_llm_layers, condition_drift  # noqa: E402
from checkpoint_parts import load_autoencoder  # noqa: E402
import common  # noqa: E402
from grpo import grpo_loss, sde_step, step_kl  # noqa: E402
import lora  # noqa: E402
import model as M  # noqa: E402


def _tiny_vae(path=None):
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 3,
                        up_block_types=["UpDecoderBlock2D"] * 3, block_out_channels=[8, 8, 8], latent_channels=4,
                        norm_num_groups=4, sample_size=shapes.CANVAS, layers_per_block=1)
    if path is not None:
        vae.save_pretrained(path)
    return vae


@pytest.fixture(scope="module")
def tiny_uae(tmp_path_factory):
    from pretrain_encoder import build_processor
    tok_dir = tmp_path_factory.mktemp("tok")
    shapes.build_tokenizer().save_pretrained(tok_dir)
    torch.manual_seed(0)
    model = M.UAE.build_tiny(build_processor(str(tok_dir)), _tiny_vae(), llm_hidden=64, llm_layers=2, vision_hidden=32,
                             vision_layers=1, dit_layers=1, dit_heads=2, dit_head_dim=16, joint_dim=32,
                             projector_hidden=32, max_text_tokens=24)
    return model.eval()


def _scene_images(n, seed=0):
    rng = random.Random(seed)
    scenes = [shapes.sample_scene(rng) for _ in range(n)]
    return torch.from_numpy(np.stack([shapes.render(s) for s in scenes])).permute(0, 3, 1, 2), scenes


def test_lora_zero_init_off_on_merge_and_peft_layout(tiny_uae, tmp_path):
    import copy
    from safetensors.torch import load_file
    model = copy.deepcopy(tiny_uae)
    texts = ["a large red circle at the top left.", "a small blue square."]
    with torch.no_grad():
        before = model.condition(texts)
    params = model.add_lora("llm", r=4, alpha=8, targets=LLM_LORA_TARGETS)
    assert len(params) == 2 * 7 * 2  # A and B for 7 linears in each of 2 layers
    with torch.no_grad():
        assert torch.equal(model.condition(texts), before)  # B = 0: the adapted model starts as the base
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
        adapted = model.condition(texts)
        assert not torch.allclose(adapted, before)
        with lora.lora_disabled(model.llm):  # the GRPO reference: adapters off
            torch.testing.assert_close(model.condition(texts), before)
        torch.testing.assert_close(model.condition(texts), adapted)
    lora.save_lora(model.llm, str(tmp_path), 4, 8, "/ckpt/base_llm")
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["peft_type"] == "LORA"
    assert config["base_model_name_or_path"] == "/ckpt/base_llm"
    # peft's rule for a list: a module is adapted when its name equals an entry or ends with "." + entry;
    # it must pick exactly our adapted modules (the vision tower's MLP also has gate/up/down_proj)
    picked = {name for name, _ in model.llm.named_modules()
              if any(name == t or name.endswith("." + t) for t in config["target_modules"])}
    assert picked == set(lora.lora_layers(model.llm)) and len(picked) == 14
    assert any(n.endswith("mlp.gate_proj") and "visual" in n for n, _ in tiny_uae.llm.named_modules())
    keys = set(load_file(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert len(keys) == len(params)
    reloaded = copy.deepcopy(tiny_uae)
    reloaded.add_lora("llm", r=4, alpha=8, targets=LLM_LORA_TARGETS)
    lora.load_lora(reloaded.llm, str(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(reloaded.condition(texts), adapted)
        with lora.lora_merged(reloaded.llm):  # how checkpoints are written: plain Linears, W + scale B A
            assert not lora.lora_layers(reloaded.llm)
            torch.testing.assert_close(reloaded.condition(texts), adapted, atol=1e-5, rtol=1e-5)
        assert len(lora.lora_layers(reloaded.llm)) == 14  # and the adapters are back


def test_uae_save_load_identical_outputs(tiny_uae, tmp_path):
    tiny_uae.save(str(tmp_path / "ckpt"))
    loaded = M.UAE.load(str(tmp_path / "ckpt")).eval()
    images, _ = _scene_images(2)
    with torch.no_grad():
        a, b = tiny_uae.condition(["a red circle."]), loaded.condition(["a red circle."])
        assert torch.equal(a, b)
        noise = torch.randn(tiny_uae.latent_shape(1), generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(tiny_uae.sample_ode(a, 3, noise=noise), loaded.sample_ode(b, 3, noise=noise))
        c = tiny_uae.caption(images, greedy=True, max_new_tokens=6)
        assert loaded.describe(images, max_new_tokens=6, greedy=True, batch_size=1) == c.texts  # per-image passes agree
        torch.testing.assert_close(loaded.caption_logprobs(c.prompt, c.ids, 0.7), tiny_uae.caption_logprobs(c.prompt, c.ids, 0.7))
    with pytest.raises(FileNotFoundError, match="no model.json"):
        M.UAE.load(str(tmp_path))


def test_text_positions_start_neutral_and_survive_save_load(tiny_uae, tmp_path):
    import copy
    model = copy.deepcopy(tiny_uae)
    dit = M.tiny_dit(model.vae, 1, 2, 16, 2, 32, model.pooled.numel(), qk_norm="rms_norm")
    model.replace_decoder(dit, 32, text_positions=True)
    hidden = model.text_hidden_states(["a red circle.", "a small blue square at the top."])
    with torch.no_grad():
        assert torch.equal(model.project(hidden), model.projector(hidden))  # zero-initialised: the paper's projector
        model.text_positions.weight.normal_()
        assert not torch.allclose(model.project(hidden), model.projector(hidden))
        model.save(str(tmp_path / "ckpt"), trained=("llm", "processor", "transformer", "vae", "scheduler"))
        loaded = M.UAE.load(str(tmp_path / "ckpt")).eval()
        assert torch.equal(loaded.text_positions.weight, model.text_positions.weight)
        assert loaded.transformer.config.qk_norm == "rms_norm"
        torch.testing.assert_close(loaded.condition(["a red circle."]), model.condition(["a red circle."]))
    assert len(loaded.decoder_modules()) == 3 and len(tiny_uae.decoder_modules()) == 2
    # a turn longer than the decoder's text positions cannot be projected: refused
    with pytest.raises(ValueError, match="exceed the decoder's 24 text positions"):
        model.project(torch.cat([hidden, hidden], 1))


def test_text_standardisation_by_hand_and_save_load(tiny_uae, tmp_path):
    import copy
    model = copy.deepcopy(tiny_uae)
    hidden = model.text_hidden_states(["a red circle.", "a small blue square at the top."])
    with torch.no_grad():
        assert torch.equal(model.project(hidden), model.projector(hidden))  # identity until set
        is_text = hidden.abs().amax(-1) > 0  # pads are exact zeros and stay so (test_pads_carry_no_text)
        tokens = hidden[is_text]
        model.text_shift.copy_(tokens.mean(0))
        model.text_scale.copy_(1 / tokens.std(0))
        standard = torch.where(is_text.unsqueeze(-1), (hidden - tokens.mean(0)) / tokens.std(0), 0)
        torch.testing.assert_close(standard[is_text].std(0), torch.ones(hidden.shape[-1]))
        torch.testing.assert_close(model.project(hidden), model.projector(standard))
        model.save(str(tmp_path / "ckpt"), trained=("llm", "processor", "transformer", "vae", "scheduler"))
        loaded = M.UAE.load(str(tmp_path / "ckpt")).eval()
        torch.testing.assert_close(loaded.project(hidden), model.project(hidden))


def test_sample_prediction_velocity_by_hand_and_save_load(tiny_uae, tmp_path):
    import copy
    model = copy.deepcopy(tiny_uae)
    model.replace_decoder(M.tiny_dit(model.vae, 1, 2, 16, 2, 32, model.pooled.numel()), 32, prediction="sample")
    cond = model.condition(["a red circle.", "a small blue square at the top."])
    x = torch.randn(model.latent_shape(2), generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.8, 0.01])
    with torch.no_grad():
        x0_hat = model.transformer(hidden_states=x, encoder_hidden_states=cond, timestep=sigma * 1000,
                                   pooled_projections=model.pooled.expand(2, -1)).sample
        v = model.velocity(x, sigma, cond)
        torch.testing.assert_close(v[0], (x[0] - x0_hat[0]) / 0.8)
        torch.testing.assert_close(v[1], (x[1] - x0_hat[1]) / 0.05)  # sigma clamped at 0.05
        # one Euler step to sigma 0 from sigma >= 0.05 lands exactly on the predicted sample
        torch.testing.assert_close(x[:1] - 0.8 * v[:1], x0_hat[:1], atol=1e-5, rtol=1e-5)
        model.save(str(tmp_path / "ckpt"), trained=("llm", "processor", "transformer", "vae", "scheduler"))
        loaded = M.UAE.load(str(tmp_path / "ckpt")).eval()
        assert loaded.prediction == "sample" and tiny_uae.prediction == "velocity"
        torch.testing.assert_close(loaded.velocity(x, sigma, cond), v)
    with pytest.raises(ValueError, match="prediction must be"):
        model.replace_decoder(model.transformer, 32, prediction="eps")


def test_caption_samples_from_the_distribution_it_scores(tiny_uae):
    """generate's processed scores (what it samples from) are softmax(logits / T), the distribution
    caption_logprobs scores, even under a generation_config like Qwen2.5-VL-Instruct's."""
    import copy
    model = copy.deepcopy(tiny_uae)
    model.llm.generation_config.update(top_k=1, top_p=0.001, repetition_penalty=1.05, temperature=0.1)
    images, _ = _scene_images(2)
    options = model.sampling_options(temperature=0.7, max_new_tokens=10)

    def sample(options):
        torch.manual_seed(0)
        out = model.llm.generate(**c.prompt, **options, return_dict_in_generate=True, output_scores=True)
        ids = out.sequences[:, c.prompt["input_ids"].shape[1]:]
        scores = torch.stack(out.scores, 1).float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
        mask = model.completion_mask(ids).bool()
        return ids, scores[mask], model.caption_logprobs(c.prompt, ids, temperature=0.7)[mask]

    with torch.no_grad():
        torch.manual_seed(0)
        c = model.caption(images, num_samples=3, temperature=0.7, max_new_tokens=10)
        assert c.ids.shape[0] == 6 and c.mask.shape == c.ids.shape and len(c.texts) == 6
        ids, sampled, forced = sample(options)
        assert torch.equal(ids, c.ids)  # the very draw caption() made
        torch.testing.assert_close(forced, sampled, atol=1e-4, rtol=1e-4)
        assert torch.isfinite(forced).all()
        # control: left to the checkpoint's config, the repetition penalty changes the distribution
        _, sampled, forced = sample({k: v for k, v in options.items() if k != "repetition_penalty"})
        assert (forced - sampled).abs().max() > 1e-3
    # each completion's mask ends at the first eos
    for row, m in zip(c.ids, c.mask):
        eos = (row == tiny_uae.tokenizer.eos_token_id).nonzero()
        assert m.sum() == (eos[0, 0] + 1 if len(eos) else len(row))


def test_packed_vision_attention_is_the_librarys(tiny_uae):
    """model.pack_vision_attention: one batched attention call over equal-length images gives the outputs and
    gradients of transformers' per-image loop; unequal lengths take the library's own path."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q
    attn = tiny_uae.llm.model.visual.blocks[0].attn
    assert type(attn) is not q.Qwen2_5_VLVisionAttention and isinstance(attn, q.Qwen2_5_VLVisionAttention)
    packed = type(attn)
    torch.manual_seed(0)
    for lengths in ([4, 4, 4], [4, 6, 2]):
        x = torch.randn(sum(lengths), attn.dim, requires_grad=True)
        cos, sin = torch.randn(2, sum(lengths), attn.head_dim)
        cu = torch.tensor([0] + lengths).cumsum(0).int()
        outs = []
        for cls in (packed, q.Qwen2_5_VLVisionAttention):
            attn.__class__ = cls
            x.grad = None
            y = attn(x, cu, position_embeddings=(cos, sin))
            (y * torch.arange(y.numel()).reshape(y.shape).sin()).sum().backward()
            outs.append((y.detach(), x.grad.clone()))
        attn.__class__ = packed
        torch.testing.assert_close(outs[0][0], outs[1][0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(outs[0][1], outs[1][1], atol=1e-6, rtol=1e-5)
        assert outs[0][0].abs().max() > 0.01  # not a trivially zero output


def test_caption_cap_is_the_decoders_window(tiny_uae):
    window = tiny_uae.max_text_tokens - tiny_uae.generate_prefix_tokens() - 1  # 24 - "<|im_start|>generate\n" - "<|im_end|>"
    assert window == 21 and tiny_uae.caption_cap(0) == window and tiny_uae.caption_cap(5) == 5
    with pytest.raises(ValueError, match="max_text_tokens=24"):  # a tail the decoder never reads: refused
        tiny_uae.caption_cap(window + 1)
    images, _ = _scene_images(2)
    with torch.no_grad():
        assert tiny_uae.caption(images, greedy=True).ids.shape[1] <= window


def test_sde_step_is_the_gaussian_by_hand_and_ode_at_zero_noise():
    torch.manual_seed(0)
    x, v = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    sigma, sigma_next, a = torch.tensor(0.6), torch.tensor(0.45), 0.7
    new, logp, mean, step_std = sde_step(x, v, sigma, sigma_next, a, sigma_max=torch.tensor(0.9))
    dt = -0.15
    s_t = a * math.sqrt(0.6 / 0.4)
    mean_hand = x + (v + s_t ** 2 / (2 * 0.6) * (x + 0.4 * v)) * dt
    torch.testing.assert_close(mean, mean_hand)
    std = s_t * math.sqrt(0.15)
    assert step_std.flatten()[0].item() == pytest.approx(std)
    density = torch.distributions.Normal(mean_hand, std).log_prob(new).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logp, density)
    _, logp_again, _, _ = sde_step(x, v, sigma, sigma_next, a, torch.tensor(0.9), prev_sample=new)
    torch.testing.assert_close(logp_again, logp)  # scoring the stored sample gives the same log-prob
    ode, none, _, _ = sde_step(x, v, sigma, sigma_next, 0.0, torch.tensor(0.9))
    assert none is None
    torch.testing.assert_close(ode, x + dt * v)  # noise level 0 is the Euler ODE step
    # sigma = 1 uses sigma_max in the denominator instead of dividing by zero
    _, logp_one, _, std_one = sde_step(x, v, torch.tensor(1.0), torch.tensor(0.9), a, torch.tensor(0.9))
    assert torch.isfinite(logp_one).all() and std_one.flatten()[0] == pytest.approx(a * math.sqrt(1 / (1 - 0.9)) * math.sqrt(0.1))


def test_sde_sampler_shapes_and_cfg(tiny_uae):
    with torch.no_grad():
        cond = tiny_uae.condition(["a red circle.", "a blue square."])
        out = tiny_uae.sample_sde(cond, steps=4, cfg_scale=2.0, negative=tiny_uae.negative_condition(2),
                                  generator=torch.Generator().manual_seed(0))
    assert out["latents"].shape == (2, 5) + tiny_uae.latent_shape(1)[1:]
    assert out["log_probs"].shape == (2, 3) and torch.isfinite(out["log_probs"]).all()
    assert out["means"].shape == (2, 3) + tiny_uae.latent_shape(1)[1:]
    images = tiny_uae.decode_latents(out["latents"][:, -1])
    assert images.shape == (2, 3, shapes.CANVAS, shapes.CANVAS) and images.min() >= 0 and images.max() <= 1
    # the guidance the sampler uses is v_neg + s (v_cond - v_neg), from separate unguided forwards
    x, sigma, negative = out["latents"][:, 1], tiny_uae.sigmas(4)[1], tiny_uae.negative_condition(2)
    with torch.no_grad():
        v_cond, v_neg = tiny_uae.velocity(x, sigma, cond), tiny_uae.velocity(x, sigma, negative)
        torch.testing.assert_close(tiny_uae.guided_velocity(x, sigma, cond, negative, 2.0), v_neg + 2.0 * (v_cond - v_neg))
    # a stochastic window: only the first step is noisy and scored, the rest are Euler ODE steps
    with torch.no_grad():
        window = tiny_uae.sample_sde(cond, steps=4, noise_level=0.7, generator=torch.Generator().manual_seed(0),
                                     sde_steps=1)
        x, sigmas = window["latents"][:, 1], tiny_uae.sigmas(4)
        for i in range(1, 4):
            x = x + (sigmas[i + 1] - sigmas[i]) * tiny_uae.velocity(x, sigmas[i], cond).float()
            torch.testing.assert_close(window["latents"][:, i + 1], x)
    assert window["log_probs"].shape == (2, 1) and window["means"].shape == (2, 1) + tiny_uae.latent_shape(1)[1:]
    # a given starting latent (grpo_decoder's shared_noise): both rows start from it, and their SDE noise differs
    start = torch.randn(tiny_uae.latent_shape(1)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        shared = tiny_uae.sample_sde(tiny_uae.condition(["a red circle."] * 2), steps=4, noise=start)
    assert torch.equal(shared["latents"][:, 0], start)
    assert not torch.equal(shared["latents"][0, -1], shared["latents"][1, -1])



def test_compiled_decoder_samples_what_the_eager_one_does(tiny_uae):
    import copy
    compiled = copy.deepcopy(tiny_uae).compile_decoder()
    texts = ["a red circle.", "a large blue square at the top left."]
    with torch.no_grad():
        eager = tiny_uae.generate(texts, steps=3, cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
        fast = compiled.generate(texts, steps=3, cfg_scale=1.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fast, eager, atol=1e-4, rtol=1e-4)

# ----------------------------------------------------------------------------- training scripts, end to end

def test_rng_states_restore_this_ranks_streams(capsys):
    common.seed_everything(7)
    saved = common.rng_states()  # one process: a list of one state
    draws = (random.random(), np.random.rand(), torch.rand(3))
    common.seed_everything(8)
    common.set_rng_state(saved)
    assert (random.random(), np.random.rand()) == draws[:2] and torch.equal(torch.rand(3), draws[2])
    common.seed_everything(8)
    fresh = torch.rand(3)
    common.seed_everything(8)
    common.set_rng_state(saved * 2)  # written by two ranks, resumed by one: the fresh streams stay
    assert torch.equal(torch.rand(3), fresh) and "keeping fresh RNG streams" in capsys.readouterr().out


TINY_ENCODER = ["--llm_hidden=64", "--llm_layers=2", "--vision_hidden=32", "--vision_layers=1", "--batch_size=8",
                "--eval_n=4", "--max_new_tokens=8", "--threads=2"]
TINY_DECODER = ["--dit_layers=1", "--dit_heads=2", "--dit_head_dim=16", "--joint_dim=32", "--projector_hidden=32",
                "--batch_size=8", "--eval_n=4", "--sample_steps=2", "--threads=2", "--compile=False"]


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A 64-scene world, its tokenizer and a tiny VAE, plus a 6-step base encoder checkpoint."""
    root = tmp_path_factory.mktemp("world")
    sys.path.insert(0, os.path.join(REPO, "data", "shapes"))
    import prepare
    prepare.main([f"--out_dir={root}", "--n_train=64", "--n_val=16", "--n_test=8", "--n_bench=8", "--clip_steps=2",
                  "--clip_batch=8", "--clip_eval_n=8", "--judge_steps=1", "--dino_steps=1", "--judge_batch=4"])
    _tiny_vae(root / "vae")
    import pretrain_encoder
    enc = root / "enc"
    pretrain_encoder.main([f"--data_dir={root}", f"--tokenizer_dir={root / 'tokenizer'}", f"--vae_dir={root / 'vae'}",
                           f"--out_dir={enc}", "--max_steps=6", "--log_interval=3", "--eval_interval=6",
                           "--save_interval=6"] + TINY_ENCODER)
    import pretrain_decoder
    pretrain_decoder.main([f"--data_dir={root}", f"--init_from={enc}", f"--out_dir={root / 'dec'}", "--max_steps=2", f"--vae_dir={root / 'vae'}",
                           "--eval_interval=2", "--save_interval=2"] + TINY_DECODER)
    return root


def _logged(text, key="loss"):
    return [float(line.split(f" {key} ")[1].split()[0]) for line in text.splitlines() if line.startswith("step ")]


def test_pretrain_encoder_loss_drops_and_resume_continues(tiny_world, capsys, tmp_path):
    import pretrain_encoder
    base_args = [f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
              f"--out_dir={tmp_path / 'enc'}", "--log_interval=2", "--eval_interval=100", "--save_interval=8",
              "--lr=3e-3", "--warmup=2"] + TINY_ENCODER
    capsys.readouterr()
    pretrain_encoder.main(base_args + ["--max_steps=8"])
    losses = _logged(capsys.readouterr().out)
    assert len(losses) == 4 and losses[-1] < 0.9 * losses[0]
    assert common.load_training_state(str(tmp_path / "enc"))["step"] == 8
    pretrain_encoder.main(base_args + ["--max_steps=12"])  # a longer run resumes where the last stopped
    out = capsys.readouterr().out
    assert "resumed from" in out and "at step 8" in out and [l for l in out.splitlines() if l.startswith("step ")][0].startswith("step 10 ")
    state = common.load_training_state(str(tmp_path / "enc"))
    assert state["step"] == 12 and state["config"]["max_steps"] == 12
    pretrain_encoder.main(base_args + ["--max_steps=12"])
    assert "is complete" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["pretrain_encoder", "cold_start"])
def test_interrupted_run_resumes_bit_for_bit(script, tiny_world, tmp_path, monkeypatch):
    """Killed after its step-4 checkpoint and rerun, a run ends with the same weights as one never stopped
    (weights, optimizer, step, data order, RNG and, in cold_start, the reward's source-feature cache all
    come back). Both scripts call caption_logprobs once per step, so its 5th call is inside step 5."""
    main = __import__(script).main
    base_args = ["--log_interval=100", "--save_interval=4", "--max_steps=8"] + {
        "pretrain_encoder": [f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}",
                             f"--vae_dir={tiny_world / 'vae'}", "--eval_interval=100", "--lr=3e-3", "--warmup=2"] + TINY_ENCODER,
        "cold_start": [f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'dec'}", "--batch_size=4", "--sample_steps=2",
                       "--max_new_tokens=8", "--lora_r=4", "--lora_alpha=8", "--threads=2",
                       f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]}[script]
    main(base_args + [f"--out_dir={tmp_path / 'whole'}"])
    calls, real = {"n": 0}, M.UAE.caption_logprobs

    def killed_in_step_5(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)
    monkeypatch.setattr(M.UAE, "caption_logprobs", killed_in_step_5)
    with pytest.raises(KeyboardInterrupt):
        main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    assert common.load_training_state(str(tmp_path / "cut"))["step"] == 4
    monkeypatch.setattr(M.UAE, "caption_logprobs", real)
    main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    whole, cut = (M.UAE.load(str(tmp_path / d)).state_dict() for d in ("whole", "cut"))
    assert whole and whole.keys() == cut.keys()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []


def test_non_finite_loss_skips_then_stops_with_the_checkpoint_kept(tiny_world, capsys, tmp_path, monkeypatch):
    import pretrain_encoder
    base_args = [f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
              f"--out_dir={tmp_path / 'enc'}", "--log_interval=1", "--eval_interval=100", "--save_interval=2",
              "--max_bad_steps=2"] + TINY_ENCODER
    pretrain_encoder.main(base_args + ["--max_steps=2"])
    before = (tmp_path / "enc" / "training_state.pt").read_bytes()
    calls = {"n": 0}
    real = M.UAE.caption_logprobs

    def nan_on_calls_1_3_4(self, *args, **kwargs):  # step 3 fails once (then trains), step 4 twice in a row
        calls["n"] += 1
        logp = real(self, *args, **kwargs)
        return logp * float("nan") if calls["n"] in (1, 3, 4) else logp

    monkeypatch.setattr(M.UAE, "caption_logprobs", nan_on_calls_1_3_4)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="2 non-finite steps in a row"):
        pretrain_encoder.main(base_args + ["--max_steps=10"])
    out = capsys.readouterr().out
    assert "warning: step 3 non-finite reward or loss, update skipped (1 in a row)" in out
    assert "step 3 loss" in out  # the redrawn batch trained
    assert "warning: step 4 non-finite reward or loss, update skipped (1 in a row)" in out
    assert "warning: step 4 non-finite reward or loss, update skipped (2 in a row)" in out
    assert (tmp_path / "enc" / "training_state.pt").read_bytes() == before  # step 2's checkpoint, untouched


def test_all_finite_agrees_over_ranks(tmp_path):
    """A NaN on one rank must skip the step on every rank, or the ranks' all-reduces stop pairing."""
    script = tmp_path / "guard.py"
    script.write_text(f"""import sys
sys.path.insert(0, {REPO!r})
import torch, torch.distributed as dist
import common
rt = common.setup_runtime("cpu", "float32", 0)
guard = common.NonFiniteGuard(rt, 2, "out")
nan_here = torch.tensor(float("nan") if rt.rank == 1 else 1.0)
verdicts = [guard.passed(common.all_finite(nan_here), 1), guard.passed(common.all_finite(torch.ones(3)), 2)]
total = torch.ones(1)
dist.all_reduce(total)  # still paired after the skip
try:
    guard.passed(common.all_finite(nan_here), 3)
    guard.passed(common.all_finite(nan_here), 4)
except RuntimeError as e:
    print(f"rank {{rt.rank}} verdicts {{verdicts}} sum {{total.item():.0f}} raised: {{e}}", flush=True)
dist.destroy_process_group()  # a process group left to interpreter exit can abort in gloo's threads
""")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} verdicts [False, True] sum 2 raised: 2 non-finite steps in a row" in result.stdout


def test_start_run_recovers_interrupted_save_and_refuses_float16(tmp_path):
    from types import SimpleNamespace
    cfg = SimpleNamespace(threads=0, device="cpu", dtype="float32", seed=0, out_dir=str(tmp_path / "run"), resume=True,
                          max_steps=5)
    (tmp_path / "run.old").mkdir()  # killed between atomic_dir's renames: run/ gone, the previous one in run.old/
    torch.save({"step": 3}, tmp_path / "run.old" / "training_state.pt")
    rt, state = common.start_run(cfg)
    assert state["step"] == 3 and (tmp_path / "run" / "training_state.pt").exists() and not (tmp_path / "run.old").exists()
    with pytest.raises(ValueError, match="float16 needs loss scaling"):
        common.start_run(SimpleNamespace(**{**vars(cfg), "dtype": "float16"}))
    with pytest.raises(ValueError, match="batch_size=5 must divide over 2 ranks"):
        common.Runtime(0, 0, 2, torch.device("cpu"), torch.float32).per_rank(5, "batch_size")
    # bad settings are named before any work: an empty or file out_dir, max_steps < 1, an unknown dtype
    (tmp_path / "a_file").write_text("x")
    for change, message in [({"out_dir": ""}, "out_dir is empty"), ({"out_dir": str(tmp_path / "a_file")}, "is a file"),
                            ({"max_steps": -5}, "max_steps=-5: must be at least 1"), ({"dtype": "foo"}, "dtype='foo': must be one of")]:
        with pytest.raises(ValueError, match=message):
            common.start_run(SimpleNamespace(**{**vars(cfg), **change}))
    (tmp_path / "run" / "training_state.pt").write_bytes(b"truncated")  # a damaged checkpoint is named, with the remedy
    with pytest.raises(ValueError, match=r"run/training_state.pt cannot be read .*--resume=False"):
        common.start_run(cfg)


def test_ema_is_fp32_whatever_the_weights_dtype():
    from pretrain_decoder import new_ema, update_ema
    weights = torch.nn.Linear(4, 4).to(torch.bfloat16)
    torch.nn.init.constant_(weights.weight, 1.0), torch.nn.init.constant_(weights.bias, 1.0)
    params = list(weights.parameters())
    ema = new_ema(params)
    assert all(e.dtype == torch.float32 for e in ema)
    for e in ema:
        e.zero_()
    for _ in range(1000):  # the EMA of a constant 1 from 0: 1 - 0.995^n (a bf16 one stalls near 0.6)
        update_ema(params, ema, 0.995)
    torch.testing.assert_close(ema[0], torch.full((4, 4), 1 - 0.995 ** 1000), atol=1e-4, rtol=0)


def test_pretrain_decoder_loss_drops(tiny_world, capsys, tmp_path):
    import pretrain_decoder
    capsys.readouterr()
    pretrain_decoder.main([f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'enc'}", f"--out_dir={tmp_path / 'dec'}",
                           "--max_steps=12", "--log_interval=3", "--eval_interval=12", "--save_interval=12", "--lr=2e-3", f"--vae_dir={tiny_world / 'vae'}",
                           "--warmup=2", "--cond_dropout=0.0"] + TINY_DECODER + ["--compile=True"])
    out = capsys.readouterr().out
    losses = _logged(out)
    assert len(losses) == 4 and min(losses[2:]) < losses[0]
    assert "eval step 12 overall" in out and " text_reliance " in out
    loaded = M.UAE.load(str(tmp_path / "dec"))  # references the encoder's parts, holds its own decoder
    meta = json.loads((tmp_path / "dec" / "model.json").read_text())
    assert meta["parts"]["transformer"] == "transformer" and os.path.isabs(meta["parts"]["llm"])
    assert loaded.transformer.config.num_layers == 1 and loaded.scheduler.config.shift == pretrain_decoder.config["timestep_shift"]  # the decoder's own schedule


def test_pretrain_decoder_in_float32_reads_its_bf16_feature_cache(tiny_world, capsys, tmp_path):
    """dtype=float32 (auto on a GPU without bf16): the cached text states are stored in bf16 and the
    projector is fp32 without autocast; training and the text-reliance probe must still run."""
    import pretrain_decoder
    pretrain_decoder.main([f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'enc'}", f"--out_dir={tmp_path / 'dec'}",
                           "--max_steps=2", "--eval_interval=2", "--save_interval=2", f"--vae_dir={tiny_world / 'vae'}",
                           "--dtype=float32"] + TINY_DECODER)
    out = capsys.readouterr().out
    assert "eval step 2 overall" in out and " text_reliance " in out


def test_two_process_gloo_run(tiny_world, tmp_path):
    out = tmp_path / "dec2"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(REPO, "pretrain_decoder.py"), f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'enc'}",
           f"--out_dir={out}", "--max_steps=4", "--log_interval=2", "--eval_interval=4", "--save_interval=4", f"--vae_dir={tiny_world / 'vae'}"] + \
        [a.replace("--threads=2", "--threads=1") for a in TINY_DECODER]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("step 4 loss") == 1  # only rank 0 prints
    assert common.load_training_state(str(out))["step"] == 4


KILL_SITE = (  # on PYTHONPATH, it makes a run's n-th optimizer step raise on every rank: a kill at a known point
    "import os, torch\n"
    "if os.environ.get('KILL_AT_STEP'):\n"
    "    real, calls = torch.optim.AdamW.step, [0]\n"
    "    def step(self, *a, **k):\n"
    "        calls[0] += 1\n"
    "        if calls[0] == int(os.environ['KILL_AT_STEP']):\n"
    "            raise SystemExit('killed')\n"
    "        return real(self, *a, **k)\n"
    "    torch.optim.AdamW.step = step\n")


@pytest.mark.parametrize("script", ["pretrain_decoder", "cold_start"])
def test_fsdp_run_killed_and_resumed_is_bit_identical_and_loads_in_one_process(script, tiny_world, tmp_path):
    """The decoder sharded with FSDP2 over 2 gloo ranks, with activation checkpointing and 2 micro-batches per
    rank (cold_start beside an unsharded LoRA, its frozen LLM and VAE in bf16 as config/paper_cold_start.py): killed in step 3 (after its step-2
    checkpoint) and rerun, a run ends where an unbroken run ends; the checkpoint, gathered whole, loads in
    one process and samples."""
    (tmp_path / "kill").mkdir()
    (tmp_path / "kill" / "sitecustomize.py").write_text(KILL_SITE)
    args = {"pretrain_decoder": [f"--init_from={tiny_world / 'enc'}", f"--vae_dir={tiny_world / 'vae'}", "--eval_interval=100",
                                 "--grad_checkpointing=True", "--micro_batch=2"] +
                                [a.replace("--threads=2", "--threads=1") for a in TINY_DECODER],
            "cold_start": [f"--init_from={tiny_world / 'dec'}", "--batch_size=4", "--sample_steps=2", "--max_new_tokens=8",
                           "--lora_r=4", "--lora_alpha=8", "--threads=1", "--grad_checkpointing=True", "--micro_batch=1",
                           "--weights_dtype=bfloat16", f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]}[script]

    def launch(out, kill=None):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, f"{script}.py"), f"--data_dir={tiny_world}", f"--out_dir={out}", "--max_steps=4",
               "--log_interval=1", "--save_interval=2", "--fsdp=True"] + args
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "kill"), os.environ.get("PYTHONPATH", "")]),
                   **({"KILL_AT_STEP": str(kill)} if kill else {}))
        return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    whole = launch(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert launch(tmp_path / "cut", kill=3).returncode != 0
    assert common.load_training_state(str(tmp_path / "cut"))["step"] == 2
    resumed = launch(tmp_path / "cut")
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]
    a, b = (common.load_training_state(str(tmp_path / d)) for d in ("whole", "cut"))
    assert a["step"] == b["step"] == 4
    for key in {"pretrain_decoder": ("raw", "ema"), "cold_start": ("decoder",)}[script]:  # gathered whole, fp32
        flat = lambda v: [t for x in v for t in (x.values() if isinstance(x, dict) else [x])]
        assert len(flat(a[key])) == len(flat(b[key])) > 0 and all(torch.equal(x, y) for x, y in zip(flat(a[key]), flat(b[key])))
        assert all(x.dtype == torch.float32 for x in flat(a[key]))
    one = M.UAE.load(str(tmp_path / "whole"))
    assert [k for k, v in one.state_dict().items() if not torch.equal(v, M.UAE.load(str(tmp_path / "cut")).state_dict()[k])] == []
    with torch.no_grad():
        image = one.generate(["a red circle."], steps=2)
    assert image.shape == (1, 3, shapes.CANVAS, shapes.CANVAS) and torch.isfinite(image).all()


# ----------------------------------------------------------------------------- the GRPO loss

def test_grpo_loss_by_hand():
    # two sequences of length 3; the second has one padded token
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -9.0]])
    old = torch.tensor([[-1.5, -1.0, -0.5], [-0.3, -1.0, 0.0]])
    ref = torch.tensor([[-1.0, -1.0, -1.0], [-0.5, -1.2, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -2.0])
    ratio = torch.exp(logp - old)  # [[e^.5, e^-1, 1], [1, e^-.2, .]]
    # row 0, A = +1: min(r, clip(r, .8, 1.2)) -> 1.2 (e^.5 = 1.65 clipped), e^-1, 1
    # row 1, A = -2: min(-2r, -2 clip(r)) -> -2, -2 e^-.2 (e^-.2 = .819 is inside [.8, 1.2])
    surrogate = torch.tensor([[-1.2, -math.exp(-1), -1.0], [2.0, 2 * math.exp(-0.2), 0.0]])
    delta = ref - logp
    k3 = torch.exp(delta) - delta - 1
    per = surrogate + 0.04 * k3
    token = (per * mask).sum() / 5
    loss, stats = grpo_loss(logp, old, ref, adv, mask, return_stats=True)
    torch.testing.assert_close(loss, token)
    assert stats["clip_fraction"].item() == pytest.approx(1 / 5)
    torch.testing.assert_close(stats["kl"], (k3 * mask).sum() / 5)
    # data parallel: row 0 on one rank (3 tokens), row 1 on another (2); averaging their losses, as
    # averaging gradients does, gives the token loss only with the count averaged over ranks (2.5)
    ranks = [grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1], tokens_per_rank=t)
             for i, t in ((0, torch.tensor(2.5)), (1, torch.tensor(2.5)))]
    torch.testing.assert_close((ranks[0] + ranks[1]) / 2, token)
    own = [grpo_loss(logp[i:i + 1], old[i:i + 1], ref[i:i + 1], adv[i:i + 1], mask[i:i + 1]) for i in (0, 1)]
    assert abs((own[0] + own[1]).item() / 2 - token.item()) > 0.05  # each rank's own count: a different loss
    seq = ((per * mask).sum(1) / mask.sum(1)).mean()
    torch.testing.assert_close(grpo_loss(logp, old, ref, adv, mask, aggregation="sequence"), seq)
    # eps_high = 0.8 lets the positive-advantage token up to ratio 1.8: e^.5 = 1.65 is no longer clipped
    high = grpo_loss(logp, old, ref, adv, mask, clip_eps_high=0.8, beta=0.0)
    surrogate_high = surrogate.clone()
    surrogate_high[0, 0] = -math.exp(0.5)
    torch.testing.assert_close(high, (surrogate_high * mask).sum() / 5)
    # low side with a negative advantage: ratio 0.5 clips to 0.8, min(-2 * 0.5, -2 * 0.8) = -1.6 -> loss 1.6
    low = grpo_loss(torch.log(torch.tensor([[0.5]])), torch.zeros(1, 1), None, torch.tensor([-2.0]),
                    torch.ones(1, 1), beta=0.0)
    torch.testing.assert_close(low, torch.tensor(1.6))
    # a zero-advantage group contributes only its KL
    zero = grpo_loss(logp, old, ref, torch.zeros(2), mask)
    torch.testing.assert_close(zero, 0.04 * (k3 * mask).sum() / 5)
    with pytest.raises(ValueError, match="aggregation"):
        grpo_loss(logp, old, ref, adv, mask, aggregation="mean")


def test_grpo_gradient_at_ratio_one_is_policy_gradient():
    logp = torch.tensor([[-1.0, -0.5], [-2.0, -0.1]], requires_grad=True)
    adv, mask = torch.tensor([0.7, -1.3]), torch.ones(2, 2)
    loss = grpo_loss(logp, logp.detach(), None, adv, mask, beta=0.0)  # mu = 1: old = logp.detach()
    loss.backward()
    # d/dlogp of -(A * exp(logp - old)) at logp = old is -A, averaged over the 4 tokens
    torch.testing.assert_close(logp.grad, -adv.view(-1, 1).expand(2, 2) / 4)
    # with the reference equal to the policy, k3 and its gradient vanish
    logp.grad = None
    grpo_loss(logp, logp.detach(), logp.detach(), torch.zeros(2), mask, beta=1.0).backward()
    torch.testing.assert_close(logp.grad, torch.zeros(2, 2))


# ----------------------------------------------------------------------------- umm2.py: UMM-2, one network that describes and draws

import umm2  # noqa: E402

UMM2_TEXTS = ["a red circle.", "a small blue square at the top left."]  # prompts of two lengths: left padding


@pytest.fixture(scope="module")
def tiny_janus(tmp_path_factory):
    """A tiny Janus built from JanusConfig and saved in the transformers layout of a Janus-Pro directory (model
    and processor in one folder): the built model and the folder."""
    torch.manual_seed(0)
    processor = umm2.build_processor(shapes.build_tokenizer("janus"), image_size=32, patch_size=8)
    built = umm2.UMM2.build_tiny(processor, llm_hidden=32, llm_layers=2, llm_heads=2, llm_kv_heads=1, vision_hidden=32,
                                 vision_layers=1, codebook_size=64, code_dim=4, levels=4, max_caption_tokens=12).eval()
    path = tmp_path_factory.mktemp("janus_pro_layout")
    built.llm.save_pretrained(path)
    processor.save_pretrained(path)
    return built, str(path)


@pytest.fixture(scope="module")
def tiny_umm2(tiny_janus):
    return umm2.UMM2.from_pretrained(tiny_janus[1], dtype=torch.float32, max_caption_tokens=12).eval()


def _sequential_sampler(distribution, keys, width, placeholder, eos=None, greedy=False):
    """What settle must reproduce: position by position, the token drawn (Gumbel-max with the same noise keys,
    or argmax) from a teacher-forced pass over `width` tokens whose later ones are placeholders."""
    tokens = torch.full((len(keys), width), placeholder)
    done = torch.zeros(len(keys), dtype=torch.bool)
    for t in range(width):
        log_probs = distribution(tokens)[:, t]
        token = log_probs.argmax(-1) if greedy else umm2.gumbel_max(log_probs, keys[:, t])
        tokens[:, t] = torch.where(done, placeholder, token)
        done |= tokens[:, t] == eos
    return tokens


def test_gumbel_max_draws_from_the_distribution_and_repeats_with_its_keys():
    def lowbias32(x):  # C. Wellons' hash in plain Python integers
        for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
            x = ((x ^ (x >> shift)) * mult) % 2 ** 32
        return x ^ (x >> 16)
    x = torch.randint(0, 2 ** 32, (1000,), generator=torch.Generator().manual_seed(0))
    assert umm2.mix32(x).tolist() == [lowbias32(v) for v in x.tolist()]
    p = torch.tensor([0.2, 0.0, 0.5, 0.3])
    keys = umm2.noise_keys(4000, 5, torch.Generator().manual_seed(0))  # 20,000 draws: a frequency's std <= 0.0036
    tokens = umm2.gumbel_max(p.log().expand(4000, 5, 4), keys)
    frequency = torch.bincount(tokens.flatten(), minlength=4) / tokens.numel()
    assert frequency[1] == 0 and (frequency - p).abs().max() < 0.015
    assert torch.equal(umm2.gumbel_max(p.log().expand(4000, 5, 4), keys), tokens)  # the same keys: the same draws
    assert torch.equal(umm2.gumbel_max(p.log().expand(4, 4), keys[:4, 2]), tokens[:4, 2])  # one position alone


def test_umm2_loads_a_janus_pro_layout_directory(tiny_janus, tiny_umm2):
    built, path = tiny_janus
    files = set(os.listdir(path))
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json"} <= files
    assert json.load(open(os.path.join(path, "config.json")))["model_type"] == "janus"
    assert type(tiny_umm2.processor).__name__ == "JanusProcessor" and tiny_umm2.sources == {"llm": path, "processor": path}
    assert (tiny_umm2.image_tokens, tiny_umm2.image_size) == (16, 32)  # a 4 x 4 grid of VQ tokens, f = 8
    images, _ = _scene_images(2)
    with torch.no_grad():
        c = built.caption(images, greedy=True, check=False)
        prompt = built.image_prompt(UMM2_TEXTS)
        tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
        assert torch.equal(tiny_umm2.caption_logprobs(c.prompt, c.ids), built.caption_logprobs(c.prompt, c.ids))
        assert torch.equal(tiny_umm2.image_logprobs(prompt, tokens), built.image_logprobs(prompt, tokens))
    half = umm2.UMM2.from_pretrained(path)  # the paper default: every weight in bfloat16
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        umm2.UMM2.from_pretrained(path + "_missing")


def test_umm2_captions_are_the_teacher_forced_sampler_and_record_its_log_probs(tiny_umm2):
    images, _ = _scene_images(2)
    model, temperature = tiny_umm2, 0.7
    c = model.caption(images, num_samples=3, temperature=temperature, generator=torch.Generator().manual_seed(1))
    assert c.ids.shape[0] == 6 and c.log_probs.shape == c.ids.shape and len(c.texts) == 6
    valid = c.mask.bool()
    with torch.no_grad():  # the update's pass: the recorded log-probs bit for bit, wherever the policy chose
        assert torch.equal(model.caption_logprobs(c.prompt, c.ids, temperature)[valid], c.log_probs[valid])
        assert (c.log_probs[~valid] == 0).all() and torch.isfinite(c.log_probs).all()
        keys = umm2.noise_keys(6, model.caption_cap(), torch.Generator().manual_seed(1))
        eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
        for greedy, ids in ((False, c.ids), (True, model.caption(images, 3, temperature, greedy=True).ids)):
            reference = _sequential_sampler(lambda t: model._caption_distribution(c.prompt, t, temperature), keys,
                                            ids.shape[1], pad, eos, greedy)
            assert torch.equal(ids, reference)
    assert len(set(c.texts)) > 1  # sampled: the three captions of an image are not all one
    assert model.describe(images, greedy=True, batch_size=1) == model.caption(images, greedy=True).texts


def test_umm2_image_tokens_with_guidance_are_the_teacher_forced_sampler(tiny_umm2, monkeypatch):
    model, scale, temperature = tiny_umm2, 3.0, 1.0

    def draw():
        return model.draw(UMM2_TEXTS, num_samples=2, cfg_scale=scale, temperature=temperature,
                          generator=torch.Generator().manual_seed(2))
    r = draw()
    assert r.tokens.shape == (4, 16) and r.texts == [UMM2_TEXTS[0]] * 2 + [UMM2_TEXTS[1]] * 2 and r.rounds == 1
    assert (r.prompt["attention_mask"][:2] == 0).any()  # the shorter caption is left-padded
    keys = umm2.noise_keys(4, 16, torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(model.image_logprobs(r.prompt, r.tokens, scale, temperature), r.log_probs)  # bit for bit
        reference = _sequential_sampler(lambda t: model._image_distribution(r.prompt, t, scale, temperature), keys,
                                        16, 0)
        assert torch.equal(r.tokens, reference)
        # the recorded log-prob is the guided distribution's, u + s (c - u) by hand for the first token, where the
        # unconditional prompt keeps bos and <begin_of_image> and pads the caption away
        ids, mask = r.prompt["input_ids"], r.prompt["attention_mask"]
        keep = (ids == model.tokenizer.bos_token_id) | (ids == model.tokenizer.convert_tokens_to_ids("<begin_of_image>"))
        uncond = torch.where(keep, ids, model.tokenizer.pad_token_id)
        head = lambda i: model.llm.model.generation_head(  # noqa: E731
            model.llm.model.language_model(input_ids=i, attention_mask=mask,
                                           position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state[:, -1])
        c, u = head(ids), head(uncond)
        first = ((u + scale * (c - u)) / temperature).log_softmax(-1).gather(-1, r.tokens[:, :1])[:, 0]
        torch.testing.assert_close(r.log_probs[:, 0], first, atol=1e-5, rtol=1e-5)
        assert (model.image_logprobs(r.prompt, r.tokens, 1.0, temperature) - r.log_probs).abs().max() > 1e-3
    # a draft that is wrong everywhere: each teacher-forced check fixes a row's first wrong token, the result is
    # still the sequential sampler's
    draft = model._draft_images

    def wrong_draft(prompt, keys, cfg_scale, temperature, given=None, start=None):
        tokens = draft(prompt, keys, cfg_scale, temperature, given, start)
        drafted = torch.arange(16) >= (0 if start is None else start[:, None])
        return torch.where(drafted, (tokens + 1) % 64, tokens)
    monkeypatch.setattr(model, "_draft_images", wrong_draft)
    fixed = draw()
    assert torch.equal(fixed.tokens, r.tokens) and torch.equal(fixed.log_probs, r.log_probs) and fixed.rounds == 17
    monkeypatch.undo()
    # VQ: tokens -> pixels in [0, 1] at the tokenizer's size, and back to a token grid
    with torch.no_grad():
        images = model.generate(UMM2_TEXTS, cfg_scale=scale, generator=torch.Generator().manual_seed(2), batch_size=1)
        assert images.shape == (2, 3, 32, 32) and 0 <= images.min() and images.max() <= 1
        tokens = model.encode_images(images)
        assert tokens.shape == (2, 16) and tokens.max() < 64
    with pytest.raises(ValueError, match="reads 32x32"):
        model.encode_images(images[..., :16, :16])


def test_umm2_lora_off_is_the_base_bit_for_bit_and_on_changes_both_directions(tiny_umm2, tmp_path):
    import copy
    model = copy.deepcopy(tiny_umm2).requires_grad_(False)
    images, _ = _scene_images(2)
    with torch.no_grad():
        c = model.caption(images, greedy=True, check=False)
        r = model.draw(UMM2_TEXTS, cfg_scale=3.0, generator=torch.Generator().manual_seed(0), check=False)

        def outputs():
            return model.caption_logprobs(c.prompt, c.ids), model.image_logprobs(r.prompt, r.tokens, 3.0)
        base = outputs()
        params = model.add_lora("llm", r=4, alpha=8)
        assert len(params) == 2 * 4 * 2  # A and B of q, k, v, o in each of 2 layers, nothing else
        adapted = lora.lora_layers(model.llm)
        assert all(name.startswith("model.language_model.layers.") for name in adapted)  # not the vision encoder's q/k/v
        assert all(torch.equal(a, b) for a, b in zip(outputs(), base))  # B = 0: the adapted model starts as the base
        for p in params:
            p.add_(torch.randn_like(p) * 0.1)
        on = outputs()
        assert all((a - b).abs().max() > 1e-4 for a, b in zip(on, base))  # describing and drawing both move
        with lora.lora_disabled(model.llm):  # the GRPO reference: adapters off, bit for bit the base
            assert all(torch.equal(a, b) for a, b in zip(outputs(), base))
        assert all(torch.equal(a, b) for a, b in zip(outputs(), on))
        rollout = model.draw(UMM2_TEXTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(1))
        captions = model.caption(images, 2, generator=torch.Generator().manual_seed(1))
    # the update's teacher-forced passes, gradients on: ratio exactly 1 on-policy, and GRPO reaches the adapters
    # through captions and image tokens (with CFG: both the conditional and the unconditional rows)
    valid = captions.mask.bool()
    logp_image = model.image_logprobs(rollout.prompt, rollout.tokens, 3.0)
    logp_caption = torch.where(valid, model.caption_logprobs(captions.prompt, captions.ids), 0.0)
    assert torch.equal(logp_image.detach(), rollout.log_probs) and torch.equal(logp_caption.detach(), captions.log_probs)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    loss = (grpo_loss(logp_image, rollout.log_probs, None, advantages, torch.ones_like(logp_image), beta=0.0) +
            grpo_loss(logp_caption, captions.log_probs, None, advantages, valid.float(), beta=0.0))
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in params) and all(p.grad.abs().sum() > 0 for p in params[1::2])
    lora.save_lora(model.llm, str(tmp_path), 4, 8)
    from safetensors.torch import load_file
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in load_file(
        tmp_path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="one network to adapt"):
        model.add_lora("transformer", 4, 8)


def test_umm2_save_load_bit_identical_relocatable_and_adapter_only_stages(tiny_umm2, tmp_path):
    import copy
    import shutil
    images, _ = _scene_images(2)

    def outputs(model):
        with torch.no_grad():
            c = model.caption(images, 2, generator=torch.Generator().manual_seed(3))
            r = model.draw(UMM2_TEXTS, 2, cfg_scale=3.0, generator=torch.Generator().manual_seed(3))
            return [c.ids, c.log_probs, r.tokens, r.log_probs]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b))
    out = tmp_path / "out"
    with common.atomic_dir(str(out / "base")) as tmp:  # how save_checkpoint writes it
        tiny_umm2.save(tmp)
    assert sorted(os.listdir(out / "base")) == ["llm", "model.json", "processor"]
    base = umm2.UMM2.load(str(out / "base")).eval()
    assert same(outputs(base), outputs(tiny_umm2))
    # a LoRA stage on top: only its adapter is written, the LLM referenced beside it (relative)
    policy = copy.deepcopy(base)
    with torch.no_grad():
        for p in policy.add_lora("llm", 4, 8):
            p.add_(torch.randn_like(p) * 0.1)
    policy.save(str(out / "rl"), trained=("llm",))
    meta = json.load(open(out / "rl" / "model.json"))
    assert meta["architecture"] == "UMM2" and meta["parts"]["llm"] == "../base/llm" and meta["adapters"] == {"llm": ["lora_llm"]}
    assert not (out / "rl" / "llm").exists()
    rl = umm2.UMM2.load(str(out / "rl")).eval()  # the adapter arrives merged: W + alpha / r B A
    with torch.no_grad():
        c = rl.caption(images, greedy=True, check=False)
        torch.testing.assert_close(rl.caption_logprobs(c.prompt, c.ids), policy.caption_logprobs(c.prompt, c.ids),
                                   atol=1e-5, rtol=1e-5)
    expected = outputs(rl)
    shutil.move(str(out), str(tmp_path / "moved"))  # the folder of stages moves as a whole
    assert same(outputs(umm2.UMM2.load(str(tmp_path / "moved" / "rl"))), expected)
    with pytest.raises(ValueError, match="holds a UMM2 checkpoint"):
        M.UAE.load(str(tmp_path / "moved" / "base"))
    # on top of a Janus-Pro directory: the directory is referenced where it lives, never copied
    tiny_umm2_policy = copy.deepcopy(tiny_umm2)
    tiny_umm2_policy.add_lora("llm", 4, 8)
    tiny_umm2_policy.save(str(tmp_path / "paper_rl"), trained=("llm",))
    assert json.load(open(tmp_path / "paper_rl" / "model.json"))["parts"] == {"llm": tiny_umm2.sources["llm"],
                                                                            "processor": tiny_umm2.sources["processor"]}


def test_vq_straight_through_forward_by_hand():
    """umm2.vq_autoencode on a 2x2-token VQ with 3 codes: tokens = nearest code on the unit sphere, the two VQ
    losses by formula, a reconstruction equal to decoding the tokens, and gradients where VQ-VAE sends them
    (the pixel loss reaches the encoder through sg(e - z) and never the codes; the codebook term only the codes)."""
    torch.manual_seed(0)
    vq = umm2.build_vq(8, codebook_size=3, code_dim=2, channels=32, levels=3)  # 8 px / 4 = a 2x2 grid
    images = torch.rand(2, 3, 8, 8)
    out = umm2.vq_autoencode(vq, images)
    z = vq.quant_conv(vq.encoder(2 * images - 1)).permute(0, 2, 3, 1).reshape(2, 4, 2).detach()
    z = z / z.norm(dim=-1, keepdim=True)
    codes = vq.quantize.embedding.weight.detach()
    codes = codes / codes.norm(dim=-1, keepdim=True)
    tokens = torch.tensor([[min(range(3), key=lambda k: float(((z[b, m] - codes[k]) ** 2).sum())) for m in range(4)]
                           for b in range(2)])
    assert torch.equal(out.tokens, tokens) and torch.allclose(out.latents, z, atol=1e-6)
    squared = ((codes[tokens] - z) ** 2).sum() / z.numel()
    assert torch.allclose(out.codebook_loss, squared) and torch.allclose(out.commitment_loss, squared)
    assert torch.allclose((out.reconstruction + 1) / 2, umm2.vq_decode(vq, tokens), atol=1e-6)  # what inference draws
    out.reconstruction.square().sum().backward()
    assert vq.quantize.embedding.weight.grad is None and vq.encoder.conv_in.weight.grad.abs().sum() > 0
    vq.zero_grad()
    umm2.vq_autoencode(vq, images).codebook_loss.backward()
    assert vq.quantize.embedding.weight.grad.abs().sum() > 0 and vq.encoder.conv_in.weight.grad is None


TINY_VQ = ["--levels=4", "--codebook_size=64", "--code_dim=4", "--batch_size=4", "--eval_n=4", "--threads=2"]
TINY_UMM2 = ["--llm_hidden=32", "--llm_layers=1", "--llm_heads=2", "--llm_kv_heads=1", "--vision_hidden=32",
             "--vision_layers=1", "--batch_size=6", "--eval_n=2", "--max_new_tokens=8", "--threads=2"]


def _killed_in_call(monkeypatch, owner, name, n):
    """Make owner.name raise KeyboardInterrupt on its n-th call (a run killed mid-step)."""
    calls, real = {"n": 0}, getattr(owner, name)

    def killed(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(owner, name, killed)


@pytest.fixture(scope="module")
def tiny_vq(tiny_world):
    """pretrain_vq's tokenizer of the tiny world, 2 steps."""
    import pretrain_vq
    out = tiny_world / "vq_stage"
    pretrain_vq.main([f"--data_dir={tiny_world}", f"--out_dir={out}", "--max_steps=2", "--eval_interval=2"] + TINY_VQ)
    return out


def test_pretrain_vq_probes_restarts_dead_codes_and_resumes_bit_for_bit(tiny_world, capsys, tmp_path, monkeypatch):
    """Killed in step 5 after its step-4 checkpoint and rerun, a run ends with the weights of one never stopped
    (code usage since the last restart included); dead codes restart; the oracle probe prints its line."""
    import pretrain_vq
    base_args = [f"--data_dir={tiny_world}", "--max_steps=6", "--save_interval=2", "--restart_interval=3",
                 "--eval_interval=6", "--log_interval=2"] + TINY_VQ
    pretrain_vq.main(base_args + [f"--out_dir={tmp_path / 'whole'}"])
    out = capsys.readouterr().out
    assert "step 3 restarted" in out  # 4 images x 36 tokens leave some of 64 codes unused
    assert re.search(r"eval step 6 overall [0-9.]+ .* codes_used [0-9]+", out)
    _killed_in_call(monkeypatch, umm2, "vq_autoencode", 5)
    with pytest.raises(KeyboardInterrupt):
        pretrain_vq.main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    assert common.load_training_state(str(tmp_path / "cut"))["step"] == 4
    monkeypatch.undo()
    pretrain_vq.main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    assert "resumed from" in capsys.readouterr().out
    whole, cut = (umm2.load_vq(str(tmp_path / d)).state_dict() for d in ("whole", "cut"))
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []


def test_pretrain_umm2_trains_both_directions_around_the_tokenizer_and_resumes_bit_for_bit(tiny_world, tiny_vq, capsys,
                                                                                          tmp_path, monkeypatch):
    """Both losses logged and falling, the probe line (GenEval-shapes and the caption report), the tokenizer
    carried over unchanged into the UMM2 checkpoint, and a run killed in step 3 resumes to the same weights."""
    import pretrain_umm2
    base_args = [f"--data_dir={tiny_world}", f"--vq_dir={tiny_vq}", "--max_steps=4", "--save_interval=2",
                 "--eval_interval=4", "--log_interval=1", "--lr=3e-3", "--warmup=1", "--cfg_scale=2.0"] + TINY_UMM2
    capsys.readouterr()
    pretrain_umm2.main(base_args + [f"--out_dir={tmp_path / 'whole'}"])
    out = capsys.readouterr().out
    i2t, t2i = _logged(out, "i2t"), _logged(out, "t2i")
    assert len(i2t) == 4 and i2t[-1] < i2t[0] and t2i[-1] < t2i[0]
    assert re.search(r"eval step 4 gen_overall [0-9.]+ .* small_object_recall \S+ .* precision \S+", out)
    whole = umm2.UMM2.load(str(tmp_path / "whole"))
    vq = umm2.load_vq(str(tiny_vq)).state_dict()
    assert all(torch.equal(v, whole.llm.model.vqmodel.state_dict()[k]) for k, v in vq.items())
    _killed_in_call(monkeypatch, umm2.UMM2, "image_logprobs", 3)
    with pytest.raises(KeyboardInterrupt):
        pretrain_umm2.main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    assert common.load_training_state(str(tmp_path / "cut"))["step"] == 2
    monkeypatch.undo()
    pretrain_umm2.main(base_args + [f"--out_dir={tmp_path / 'cut'}"])
    whole, cut = whole.state_dict(), umm2.UMM2.load(str(tmp_path / "cut")).state_dict()
    assert [k for k in whole if not torch.equal(whole[k], cut[k])] == []



def test_pretrain_umm2_refuses_a_caption_word_its_tokenizer_lacks(tiny_world, tiny_vq, tmp_path):
    """Training targets go through Captioner.check_texts, as pretrain_encoder's do: an unknown word is an error
    naming file:line, never a silent [UNK]."""
    import shutil
    import pretrain_umm2
    data = tmp_path / "data"
    shutil.copytree(tiny_world, data, ignore=shutil.ignore_patterns("enc", "dec*", "vae"))
    rows = (data / "train.jsonl").read_text().splitlines()
    bad = json.loads(rows[1])
    bad["partial_caption"] = "a zorble circle."
    (data / "train.jsonl").write_text("\n".join([rows[0], json.dumps(bad)] + rows[2:]) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:2: \"partial_caption\" has words the tokenizer does not know: 'zorble'"):
        pretrain_umm2.main([f"--data_dir={data}", f"--vq_dir={tiny_vq}", "--max_steps=1", f"--out_dir={tmp_path / 'u'}"] + TINY_UMM2)

# ----------------------------------------------------------------------------- UMM-2: Unified-GRPO and eval_unified

UMM2_RL = ["--lora_r=4", "--lora_alpha=8", "--max_new_tokens=8", "--group_size=3", "--cfg_scale=3.0", "--threads=1",
           "--log_interval=100"]


@pytest.fixture(scope="module")
def umm2_ckpt(tiny_world, tiny_vq):
    """A tiny pretrained UMM2 checkpoint (pretrain_umm2, 2 steps, on tiny_vq's tokenizer): what the RL stages start from."""
    import pretrain_umm2
    out = tiny_world / "umm2_stage"
    pretrain_umm2.main([f"--data_dir={tiny_world}", f"--vq_dir={tiny_vq}", f"--out_dir={out}", "--max_steps=2",
                        "--eval_interval=100"] + TINY_UMM2)
    return out


def _umm2_rl_args(world, init, out, stage):
    shared = [f"--data_dir={world}", f"--init_from={init}", f"--out_dir={out}", "--save_interval=2",
              f"--reward_backbone=open_clip:ShapesCLIP:{world / 'shapes_clip.pt'}"] + UMM2_RL
    return shared + {"encoder": ["--images_per_step=2", "--probe_n=4", "--compile=False"],
                     "decoder": ["--captions_per_step=2", "--eval_n=4", "--clip_eps=0.2", "--micro_batch=4"]}[stage]


def _umm2_killed_run_resumes_bit_for_bit(main, args, tmp_path, monkeypatch, capsys, name: str, n: int):
    """The run of `args` (out_dir tmp_path/whole, 4 steps, saved every 2) again into tmp_path/cut, killed by the n-th
    call of UMM2.<name> (in step 3) and rerun: it resumes and ends with the whole run's adapter bit for bit."""
    from safetensors.torch import load_file
    cut = [a for a in args if not a.startswith("--out_dir=")] + [f"--out_dir={tmp_path / 'cut'}"]
    _killed_in_call(monkeypatch, umm2.UMM2, name, n)
    with pytest.raises(KeyboardInterrupt):
        main(cut)
    assert common.load_training_state(str(tmp_path / "cut"))["step"] == 2
    monkeypatch.undo()
    main(cut)
    assert "resumed from" in capsys.readouterr().out
    whole, resumed = (load_file(tmp_path / d / "lora_llm" / "lora.safetensors") for d in ("whole", "cut"))
    assert whole and whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_umm2_grpo_encoder_trains_its_llm_lora_off_is_the_reference_and_resumes_bit_for_bit(tiny_world, umm2_ckpt, capsys,
                                                                                             tmp_path, monkeypatch):
    """grpo_encoder on a UMM2 checkpoint: GRPO on caption tokens, the reward renders drawn by the same LLM with its
    adapters off (UMM2.redraw), the drift anchor on its T2I prompt states; the saved adapter off gives the checkpoint
    it started from bit for bit; a run killed in step 3 resumes to the weights of one never stopped."""
    import grpo_encoder
    args = _umm2_rl_args(tiny_world, umm2_ckpt, tmp_path / "whole", "encoder") + ["--max_steps=4"]
    capsys.readouterr()
    grpo_encoder.main(args)
    text = capsys.readouterr().out
    assert re.search(r"eval step 4 recall [0-9.]+ small_object_recall", text)
    rows = [json.loads(l) for l in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(0 < r["reward_mean"] <= 1 for r in rows)
    assert rows[0]["kl"] == rows[0]["drift"] == 0 and rows[1]["kl"] > 0 and rows[1]["drift"] > 0  # B = 0 at step 1
    meta = json.loads((tmp_path / "whole" / "model.json").read_text())
    assert meta["architecture"] == "UMM2" and meta["adapters"] == {"llm": ["lora_llm"]}
    assert not (tmp_path / "whole" / "llm").exists()  # only the adapter is written; the LLM is referenced
    # the reference (adapters off) is the checkpoint the run started from, in both directions
    base = umm2.UMM2.load(str(umm2_ckpt)).eval()
    policy = umm2.UMM2.load(str(umm2_ckpt)).eval()
    policy.add_lora("llm", 4, 8, LLM_LORA_TARGETS)
    lora.load_lora(policy.llm, str(tmp_path / "whole" / "lora_llm"))
    images, _ = _scene_images(2)
    with torch.no_grad():
        c = base.caption(images, greedy=True, check=False)
        r = base.draw(UMM2_TEXTS, cfg_scale=3.0, generator=torch.Generator().manual_seed(0), check=False)
        outputs = lambda m: (m.caption_logprobs(c.prompt, c.ids), m.image_logprobs(r.prompt, r.tokens, 3.0))
        with lora.lora_disabled(policy.llm):
            assert all(torch.equal(a, b) for a, b in zip(outputs(policy), outputs(base)))
        on, merged = outputs(policy), outputs(load_autoencoder(str(tmp_path / "whole")).eval())
        assert all((a - b).abs().max() > 0 for a, b in zip(on, outputs(base)))  # RL moved describing and drawing
        for a, b in zip(merged, on):  # the checkpoint loads with the adapter merged
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # ref + policy caption log-probs per step (mu = 1, one micro-batch): the 5th call is in step 3
    _umm2_killed_run_resumes_bit_for_bit(grpo_encoder.main, args, tmp_path, monkeypatch, capsys, "caption_logprobs", 5)


def test_umm2_grpo_decoder_is_on_policy_with_guidance_and_lora_off_is_the_reference(tiny_world, umm2_ckpt):
    """Decoder RL's rollout of a UMM2 (guided VQ tokens, in the micro-batches they were drawn in) and its update,
    with random adapters on the LLM: the teacher-forced image-token log-probs equal the sampled ones (ratio 1,
    CFG on), the reference is the adapters-off model bit for bit, and the token-level GRPO loss reaches the
    adapters; the update refuses rows that were not drawn together."""
    import grpo_decoder
    from common import setup_runtime
    from reward import ReconstructionReward, load_backbone
    rt = setup_runtime("cpu", "float32", 0)
    base = umm2.UMM2.load(str(umm2_ckpt)).eval()
    model = umm2.UMM2.load(str(umm2_ckpt))
    model.requires_grad_(False)
    part, targets = model.DECODER_LORA
    params = model.add_lora(part, 4, 8, targets)
    with torch.no_grad():
        for p in params:
            p.normal_(std=0.05)
    reward_fn = ReconstructionReward(load_backbone(f"open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}", rt.device))
    cfg = configure(grpo_decoder.config, ["--group_size=3", "--max_new_tokens=8", "--cfg_scale=3.0", "--micro_batch=4",
                                          "--clip_eps=0.2"])
    images = load_images(read_jsonl(str(tiny_world / "train.jsonl"))[:2])
    out = grpo_decoder.rollout(model, rt, reward_fn, images, [0, 1], cfg)
    assert out["chunks"] == [slice(0, 4), slice(4, 6)] and out["images"].shape == (6, 3, shapes.CANVAS, shapes.CANVAS)
    assert [d.tokens.shape for d in out["draws"]] == [(4, model.image_tokens), (2, model.image_tokens)]
    with torch.no_grad():
        for c, d in zip(out["chunks"], out["draws"]):
            logp, old, ref, kl = model.decoder_logprobs(out, None, c)
            assert torch.equal(logp, old) and kl is None  # the log-prob of the distribution each token was drawn from
            assert torch.equal(ref, base.image_logprobs(d.prompt, d.tokens, 3.0)) and not torch.equal(ref, logp)
        with pytest.raises(ValueError, match="were not drawn together"):
            model.decoder_logprobs(out, None, slice(0, 6))
    opt = torch.optim.SGD(params, lr=0.0)
    stats = grpo_decoder.policy_step(model, rt, opt, params, out, torch.tensor([1.0, -0.5, -0.5, 0.3, -1.2, 0.9]), cfg,
                                     check_on_policy=True)
    assert stats["finite"] and stats["max_ratio_error"] == 0 and stats["kl"] > 0
    assert all(torch.isfinite(p.grad).all() for p in params) and all(p.grad.abs().sum() > 0 for p in params)
    with pytest.raises(ValueError, match="shared_noise"):
        grpo_decoder.rollout(model, rt, reward_fn, images, [0, 1], configure(grpo_decoder.config, ["--shared_noise=True"]))


def test_umm2_grpo_decoder_steps_on_policy_and_resumes_bit_for_bit(tiny_world, umm2_ckpt, capsys, tmp_path, monkeypatch):
    """grpo_decoder on a UMM2 checkpoint end to end: the on-policy check at the first step (bf16 autocast, CFG 3,
    two micro-batches) passes, LoRA on the LLM saved alone, and a run killed in step 3 resumes bit for bit."""
    import grpo_decoder
    args = _umm2_rl_args(tiny_world, umm2_ckpt, tmp_path / "whole", "decoder") + ["--max_steps=4", "--eval_interval=4"]
    capsys.readouterr()
    grpo_decoder.main(args)
    text = capsys.readouterr().out
    error = float(text.split("max |ratio - 1| = ")[1].split()[0])
    assert error <= 1e-5 and "(<= 1e-5: ok)" in text, text
    assert "LoRA parameters on UMM2.llm" in text and "eval step 0 overall" in text and "eval step 4 overall" in text
    rows = [json.loads(l) for l in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and rows[0]["kl"] == 0 and rows[1]["kl"] > 0
    assert json.loads((tmp_path / "whole" / "model.json").read_text())["adapters"] == {"llm": ["lora_llm"]}
    # policy + reference image log-probs of 2 micro-batches per step: the 9th call is in step 3
    _umm2_killed_run_resumes_bit_for_bit(grpo_decoder.main, args, tmp_path, monkeypatch, capsys, "image_logprobs", 9)


def test_eval_unified_on_a_umm2_checkpoint_writes_the_released_layout(tiny_world, umm2_ckpt, tmp_path):
    """eval_unified reads the architecture from the checkpoint: a UMM2 captions, redraws from its captions and from
    the true ones, and the results have the UAE's layout (the released scorer's keys and the oracle tables); its
    text reliance is the VQ tokens' NLL under the own caption over another's, by hand."""
    import eval_unified
    save_clip(tmp_path / "clip"), save_dinov2(tmp_path / "dinov2")
    out = tmp_path / "ev"
    cfg = eval_unified.configure(eval_unified.config, [
        f"--ckpt={umm2_ckpt}", f"--data={tiny_world / 'bench.jsonl'}", f"--out_dir={out}", "--max_new_tokens=8",
        "--cfg_scale=3.0", "--compile=False", "--dtype=float32", f"--clip=hf:{tmp_path / 'clip'}",
        f"--dinov2=hf:{tmp_path / 'dinov2'}", "--longclip=", f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"])
    results = eval_unified.evaluate(cfg)
    assert set(results) == RELEASED_KEYS | {"unified_score", "unified_score_per_image", "reward_cosine", "reward_cosine_per_image",
                                            "understanding", "generation", "generation_partial", "unification", "config"}
    assert results["model_types"] == ["clip", "dinov2"]
    assert all(s["total_images"] == s["valid_pairs"] == 8 for s in results["statistics_by_model"].values())
    assert set(results["generation"]) >= {"overall", "overall_per_image", "unified_score", "text_reliance", "text_reliance_per_image"}
    assert set(results["unification"]) == {"unified_score", "reward_cosine", "scene_f1", "mentioned_object_recall",
                                           "captions_cut", "turns_cut", "unknown_word_captions"}
    assert results["unification"]["turns_cut"] == 0  # T2I reads a caption whole
    recons = sorted(os.listdir(out / "reconstructions"))
    assert len(recons) == 8 and load_image({"image_path": str(out / "reconstructions" / recons[0]), "where": "r"}).shape == (
        shapes.CANVAS, shapes.CANVAS, 3)
    texts = [json.loads(l)["caption"] for l in (out / "captions.jsonl").read_text().splitlines()]
    bench = read_jsonl(str(tiny_world / "bench.jsonl"))
    assert results["understanding"] == pytest.approx(shapes.caption_report(texts, shapes.scenes_of(bench)), nan_ok=True)
    model = umm2.UMM2.load(str(umm2_ckpt)).eval()
    captions, names = [r["caption"] for r in bench], [os.path.basename(r["image"]) for r in bench]
    with torch.no_grad():
        tokens = model.encode_images(load_images(bench[:1]))
        nll = [-model.image_logprobs(model.image_prompt([t]), tokens, 1.0).sum() for t in (captions[0], captions[-1])]
    assert results["generation"]["text_reliance_per_image"][names[0]] == pytest.approx((nll[0] / nll[1]).item(), rel=1e-5)


# ----------------------------------------------------------------------------- paper scale: loading real layouts

QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>"]
PAPER_LLM_HIDDEN, PAPER_JOINT_DIM, PAPER_POOLED_DIM = 64, 32, 32  # pooled = CLIP-L proj 16 + CLIP-G proj 16


def _qwen_tokenizer():
    """Byte-level BPE trained on a few sentences, wrapped as transformers' Qwen2Tokenizer (vocab + merge tuples)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=QWEN_SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([PAPER_CAPTION_PROMPT, "a cat sits on a red mat.", "a dog and a blue square at the top left.",
                              "user assistant generate system"] * 3, trainer)
    bpe = json.loads(core.to_str())["model"]
    tok = Qwen2Tokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]], eos_token="<|im_end|>",
                         pad_token="<|endoftext|>",
                         extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                                               "vision_start_token": "<|vision_start|>",
                                               "vision_end_token": "<|vision_end|>"})
    # the released tokenizer's additional_special_tokens (transformers 5: extra_special_tokens), matched whole
    tok.add_special_tokens({"extra_special_tokens": [t for t in QWEN_SPECIAL if t not in (tok.eos_token, tok.pad_token)]},
                           replace_extra_special_tokens=False)
    tok.chat_template = shapes.CHAT_TEMPLATE
    return tok


def _write_qwen(path):
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                              Qwen2VLImageProcessor)
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor
    tok = _qwen_tokenizer()
    sizes = dict(patch_size=8, merge_size=2, temporal_patch_size=2, min_pixels=32 * 32, max_pixels=32 * 32)
    processor = Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**sizes), tokenizer=tok,
                                    video_processor=Qwen2VLVideoProcessor(**sizes), chat_template=shapes.CHAT_TEMPLATE)
    ids, heads = tok.convert_tokens_to_ids, 4
    head_dim = PAPER_LLM_HIDDEN // heads
    llm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=PAPER_LLM_HIDDEN, intermediate_size=2 * PAPER_LLM_HIDDEN,
                         num_hidden_layers=2, num_attention_heads=heads, num_key_value_heads=2,
                         max_position_embeddings=512, bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, patch_size=8,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=PAPER_LLM_HIDDEN,
                           window_size=8 * 2 * 4, fullatt_block_indexes=[0]),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=True))
    llm.save_pretrained(path)
    processor.save_pretrained(path)


def _clip_tokenizer(path):
    """CLIPTokenizer from a hand-written vocab.json + merges.txt: every byte-level character, alone and as a
    word end (`</w>`), plus a few merges."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    for suffix in ("", "</w>"):
        for c in alphabet:
            vocab[c + suffix] = len(vocab)
    merges = [("c", "a"), ("ca", "t</w>"), ("a", "n</w>")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    os.makedirs(path)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77}, f)
    tok = CLIPTokenizer.from_pretrained(path)
    assert tok.convert_ids_to_tokens(tok("a cat").input_ids) == ["<|startoftext|>", "a</w>", "cat</w>", "<|endoftext|>"]
    return tok


def _write_sd3(path, scratch):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from tokenizers import Tokenizer, models, trainers
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast
    clip_tok = _clip_tokenizer(os.path.join(scratch, "clip_tokenizer"))

    def clip(width, projection_dim):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(clip_tok), hidden_size=width, intermediate_size=2 * width, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=77, projection_dim=projection_dim,
            bos_token_id=clip_tok.bos_token_id, eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id))

    # T5: a Unigram model trained by `tokenizers` (pad, eos, unk first, as T5 expects)
    unigram = Tokenizer(models.Unigram())
    unigram.train_from_iterator(["a cat sits on a red mat", "a dog and a blue square"] * 4, trainers.UnigramTrainer(
        vocab_size=40, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False))
    t5_tok = T5TokenizerFast(vocab=[tuple(p) for p in json.loads(unigram.to_str())["model"]["vocab"]], extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tok), d_model=PAPER_JOINT_DIM, d_kv=8, d_ff=64, num_layers=1,
                                 num_heads=2, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=PAPER_JOINT_DIM, caption_projection_dim=16,
        pooled_projection_dim=PAPER_POOLED_DIM, pos_embed_max_size=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 16], layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16, scaling_factor=1.5, shift_factor=0.1)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
                                    text_encoder=clip(16, 16), tokenizer=clip_tok, text_encoder_2=clip(24, 16),
                                    tokenizer_2=clip_tok, text_encoder_3=t5, tokenizer_3=t5_tok)
    pipe.save_pretrained(path)


@pytest.fixture(scope="module")
def paper_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    qwen_dir, sd3_dir = str(root / "qwen"), str(root / "sd3")
    with torch.random.fork_rng():  # the global RNG of other tests is left as it was
        torch.manual_seed(0)
        _write_qwen(qwen_dir)
        _write_sd3(sd3_dir, str(root))
    return qwen_dir, sd3_dir


@pytest.fixture(scope="module")
def paper_uae(paper_dirs):
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the projector is initialised in __init__
        return M.UAE.from_pretrained(*paper_dirs, dtype=torch.float32, projector_hidden=32, max_text_tokens=16).eval()


def _reference_pooled(sd3_dir, dtype=torch.float32):
    """SD3's pooled projection of the empty prompt, the pipeline's own way (all components loaded)."""
    from diffusers import StableDiffusion3Pipeline
    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, dtype=dtype)
    with torch.no_grad():
        _, _, pooled, _ = pipe.encode_prompt(prompt="", prompt_2=None, prompt_3=None, do_classifier_free_guidance=False)
    return pooled.float()


def test_from_pretrained_loads_the_two_directories(paper_dirs, paper_uae):
    from diffusers import SD3Transformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    qwen_dir, sd3_dir = paper_dirs
    m = paper_uae
    assert isinstance(m.llm, Qwen2_5_VLForConditionalGeneration) and isinstance(m.processor, Qwen2_5_VLProcessor)
    assert isinstance(m.transformer, SD3Transformer2DModel)
    assert m.tokenizer.eos_token == "<|im_end|>" and m.tokenizer.image_token == "<|image_pad|>"
    start = m.tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert m.tokenizer("<|im_start|>user")["input_ids"][0] == start
    # captions may end with eos but never hold chat-control / vision tokens
    assert start in m.banned_token_ids and m.tokenizer.image_token_id in m.banned_token_ids
    assert m.tokenizer.eos_token_id not in m.banned_token_ids
    assert m.scheduler.config.shift == 3.0 and m.caption_prompt == PAPER_CAPTION_PROMPT
    # the constant pooled projection is CLIP-L + CLIP-G pooled("") -- exactly what the pipeline computes
    reference = _reference_pooled(sd3_dir)
    assert reference.shape == (1, PAPER_POOLED_DIM) and m.pooled.shape == (1, PAPER_POOLED_DIM)
    assert m.pooled.dtype == torch.float32 and reference.abs().sum() > 0
    torch.testing.assert_close(m.pooled, reference, atol=1e-6, rtol=1e-6)
    # projector: LLM hidden -> projector_hidden -> the DiT's joint_attention_dim
    assert (m.projector[0].in_features, m.projector[0].out_features) == (PAPER_LLM_HIDDEN, 32)
    assert (m.projector[2].in_features, m.projector[2].out_features) == (32, PAPER_JOINT_DIM)
    assert m.transformer.config.joint_attention_dim == PAPER_JOINT_DIM
    with torch.no_grad():
        assert m.condition(["a cat", "a dog on a mat"]).shape == (2, 16, PAPER_JOINT_DIM)  # max_text_tokens = 16
    assert m.sources == {"llm": qwen_dir, "processor": qwen_dir, "transformer": os.path.join(sd3_dir, "transformer"),
                         "vae": os.path.join(sd3_dir, "vae"), "scheduler": os.path.join(sd3_dir, "scheduler")}
    assert all(os.path.isdir(p) for p in m.sources.values())
    assert not any(p.requires_grad for p in m.vae.parameters())


def test_caption_encode_generate_end_to_end(paper_uae):
    m = paper_uae
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8))
    with torch.random.fork_rng():
        torch.manual_seed(0)
        c = m.caption(images, num_samples=2, max_new_tokens=5)
        n, length = c.ids.shape
        assert n == 4 and 1 <= length <= 5 and c.mask.shape == c.ids.shape and len(c.texts) == 4
        mask = c.mask.bool()
        assert mask[:, 0].all()  # the first sampled token is always the policy's choice
        assert torch.equal(c.prompt["input_ids"][0], c.prompt["input_ids"][1])  # image-major repeats
        assert not np.isin(c.ids[mask].numpy(), m.banned_token_ids).any()
        with torch.no_grad():
            forced = m.caption_logprobs(c.prompt, c.ids)
        assert forced.shape == c.ids.shape and torch.isfinite(forced[mask]).all() and (forced[mask] <= 0).all()

        # byte-level BPE may re-encode a decoded caption longer than its ids: the model's own captions are
        # cut to the window and counted (allow_cut), other text longer than the window is refused
        over = sum(n > m.max_text_tokens for n in m.turn_lengths(c.texts))
        before = m.turns_cut
        images_out = m.generate(c.texts, steps=2, cfg_scale=2.0, allow_cut=True)
        assert m.turns_cut - before == over
        if over:
            with pytest.raises(ValueError, match="exceed the decoder's window"):
                m.condition(c.texts)
        assert images_out.shape == (4, 3, 16, 16) and images_out.dtype == torch.float32  # 8x8 latents, 2x VAE
        assert torch.isfinite(images_out).all() and images_out.min() >= 0 and images_out.max() <= 1
        with torch.no_grad():
            z = m.encode_images(images_out)
            assert z.shape == m.latent_shape(4) == (4, 4, 8, 8)
            sde = m.sample_sde(m.condition(c.texts, allow_cut=True), steps=3)
        assert sde["log_probs"].shape == (4, 2) and torch.isfinite(sde["log_probs"]).all()
        assert sde["latents"].shape == (4, 4, 4, 8, 8) and sde["means"].shape == (4, 2, 4, 8, 8)
        assert torch.isfinite(sde["latents"]).all()


def test_from_pretrained_bf16_casts_every_part(paper_dirs, paper_uae):
    m = M.UAE.from_pretrained(*paper_dirs, dtype=torch.bfloat16, projector_hidden=32, max_text_tokens=16).eval()
    for name, part in (("transformer", m.transformer), ("vae", m.vae), ("llm", m.llm)):
        dtypes = {p.dtype for p in part.parameters()}
        assert dtypes == {torch.bfloat16}, f"{name} parameters are {dtypes}"
    assert m.pooled.dtype == torch.float32  # stored fp32, computed by bf16 CLIPs
    torch.testing.assert_close(m.pooled, paper_uae.pooled, atol=0.05, rtol=0.05)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # how the scripts run (Runtime.autocast)
        images = m.generate(["a cat"], steps=1, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def test_pretrain_decoder_from_the_paper_checkpoints(paper_dirs, tiny_world, capsys, tmp_path):
    """The paper-scale entry: init_from=pretrained builds the first UAE from the two checkpoint
    directories and trains its projector + DiT on any JSONL folder (no scenes: no GenEval probe)."""
    import pretrain_decoder
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val"):  # a user's folder: image + caption only
        rows = [json.loads(line) for line in (tiny_world / f"{split}.jsonl").read_text().splitlines()][:8]
        (data / f"{split}.jsonl").write_text("".join(json.dumps({"image": str(tiny_world / r["image"]), "caption": r["caption"]}) + "\n" for r in rows))
    capsys.readouterr()
    pretrain_decoder.main([os.path.join(REPO, "config", "paper_pretrain_decoder.py"), f"--data_dir={data}",
                           f"--qwen_dir={paper_dirs[0]}", f"--sd3_dir={paper_dirs[1]}", f"--out_dir={tmp_path / 'dec'}",
                           "--weights_dtype=float32", "--fsdp=False", "--image_size=32", "--batch_size=2", "--max_steps=2", "--warmup=1",
                           "--eval_n=2", "--sample_steps=2", "--log_interval=1", "--threads=1", "--compile=False"])
    out = capsys.readouterr().out
    assert len(_logged(out)) == 2 and "text_reliance" in out and "overall" not in out
    meta = json.loads((tmp_path / "dec" / "model.json").read_text())
    assert meta["parts"]["llm"] == os.path.abspath(paper_dirs[0])  # the frozen LLM is referenced, not copied
    assert meta["parts"]["transformer"] == "transformer"


def test_paper_configs_run_every_stage_on_a_folder_of_mixed_images(paper_uae, tiny_world, tmp_path):
    """Paper layout and each stage's config/paper_*.py (sizes overridden), real images: sizes, modes and formats
    mixed, no captions where a stage needs none; each stage reads its images per step, resized and
    centre-cropped to the decoder's size (16 here)."""
    import cold_start
    import eval_unified
    import grpo_decoder
    import grpo_encoder
    from PIL import Image
    rng = np.random.default_rng(0)
    images = tmp_path / "bench"
    images.mkdir()
    for i, (w, h, mode, ext) in enumerate([(40, 24, "RGB", "png"), (17, 31, "RGBA", "png"), (20, 20, "L", "jpg"),
                                            (64, 48, "RGB", "jpg"), (12, 30, "P", "png"), (33, 33, "RGB", "webp")]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode).save(images / f"{i}.{ext}")
    data = tmp_path / "data"
    data.mkdir()
    names = sorted(os.listdir(images))
    (data / "train.jsonl").write_text("".join(json.dumps({"image": str(images / n)}) + "\n" for n in names))
    (data / "val.jsonl").write_text("".join(json.dumps({"image": str(images / n), "caption": "a photo."}) + "\n" for n in names))
    captioned = tmp_path / "captioned"  # cold start anchors the true captions' conditioning: it needs them
    captioned.mkdir()
    for split in ("train", "val"):
        (captioned / f"{split}.jsonl").write_text((data / "val.jsonl").read_text())
    ckpt = tmp_path / "uae"
    paper_uae.save(str(ckpt))
    save_clip(tmp_path / "clip")
    paper = lambda stage: os.path.join(REPO, "config", f"paper_{stage}.py")  # each stage's paper config, sizes overridden
    tiny = [f"--reward_backbone=hf:{tmp_path / 'clip'}", "--image_size=0", "--lora_r=4", "--lora_alpha=8",
            "--max_new_tokens=4", "--max_steps=2", "--threads=2"]
    cold_start.main([paper("cold_start"), f"--data_dir={captioned}", f"--init_from={ckpt}", f"--out_dir={tmp_path / 'cs'}",
                     "--batch_size=2", "--sample_steps=2", "--fsdp=False"] + tiny)  # one process: FSDP needs torchrun
    grpo_encoder.main([paper("grpo_encoder"), f"--data_dir={data}", f"--init_from={tmp_path / 'cs'}", f"--out_dir={tmp_path / 'enc'}",
                       "--images_per_step=2", "--group_size=2", "--decode_steps=2", "--probe_n=2", "--compile=False"] + tiny)
    grpo_decoder.main([paper("grpo_decoder"), f"--data_dir={data}", f"--init_from={tmp_path / 'enc'}", f"--out_dir={tmp_path / 'dec'}",
                       "--captions_per_step=2", "--group_size=2", "--train_steps=3", "--eval_steps=2", "--eval_n=2"] + tiny)
    for stage in ("cs", "enc", "dec"):
        assert common.load_training_state(str(tmp_path / stage))["step"] == 2
    results = eval_unified.evaluate(eval_unified.configure(eval_unified.config, [
        paper("eval"), f"--ckpt={tmp_path / 'dec'}", f"--data={images}", f"--out_dir={tmp_path / 'ev'}", "--sample_steps=2",
        "--max_new_tokens=4", "--compile=False", f"--clip=hf:{tmp_path / 'clip'}", "--longclip=", "--dinov2=", "--dinov3="]))
    assert results["statistics_by_model"]["clip"]["valid_pairs"] == 6 and "understanding" not in results
    assert sorted(os.listdir(tmp_path / "ev" / "reconstructions")) == sorted(os.path.splitext(n)[0] + ".png" for n in names)


def test_save_references_sources_and_load_reproduces(paper_dirs, paper_uae, tmp_path):
    qwen_dir, sd3_dir = paper_dirs
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    paper_uae.save(str(ckpt), trained=())
    assert sorted(os.listdir(ckpt)) == ["model.json", "projector.safetensors"]  # no copies of llm / DiT / VAE
    meta = json.loads((ckpt / "model.json").read_text())
    assert meta["parts"] == {"llm": os.path.abspath(qwen_dir), "processor": os.path.abspath(qwen_dir),
                             "transformer": os.path.abspath(os.path.join(sd3_dir, "transformer")),
                             "vae": os.path.abspath(os.path.join(sd3_dir, "vae")),
                             "scheduler": os.path.abspath(os.path.join(sd3_dir, "scheduler"))}
    assert meta["projector_hidden"] == 32 and meta["max_text_tokens"] == 16
    assert meta["caption_prompt"] == PAPER_CAPTION_PROMPT
    with torch.random.fork_rng():
        torch.manual_seed(123)  # a different fresh projector: equality below proves it was loaded
        loaded = M.UAE.load(str(ckpt)).eval()
    assert torch.equal(loaded.pooled, paper_uae.pooled)
    assert loaded.scheduler.config.shift == 3.0
    with torch.no_grad():
        assert torch.equal(loaded.condition(["a cat"]), paper_uae.condition(["a cat"]))
        noise = torch.randn(paper_uae.latent_shape(1), generator=torch.Generator().manual_seed(0))
        a, b = paper_uae.condition(["a cat"]), loaded.condition(["a cat"])
        torch.testing.assert_close(loaded.sample_ode(b, 2, noise=noise), paper_uae.sample_ode(a, 2, noise=noise))


def test_a_folder_of_stages_moves_as_a_whole(paper_uae, tmp_path):
    import shutil
    first, second = tmp_path / "out" / "first", tmp_path / "out" / "second"
    paper_uae.save(str(first))  # every part written
    M.UAE.load(str(first)).save(str(second), trained=("llm",))  # a later stage: the other parts point into `first`
    meta = json.loads((second / "model.json").read_text())
    assert meta["parts"]["transformer"] == os.path.join("..", "first", "transformer") and meta["parts"]["llm"] == "llm"
    shutil.move(str(tmp_path / "out"), str(tmp_path / "moved"))
    loaded = M.UAE.load(str(tmp_path / "moved" / "second"))
    assert loaded.sources["transformer"] == str(tmp_path / "moved" / "first" / "transformer")
    with torch.no_grad():
        torch.testing.assert_close(loaded.condition(["a cat"]), paper_uae.condition(["a cat"]))


def test_lora_stages_save_only_their_adapters(tiny_uae, tmp_path):
    """A LoRA stage writes its adapter, not a merged copy of the part; loading adds every stage's adapter in
    order and gives exactly the weights a merged copy would, also after the folder moves."""
    import shutil
    out = tmp_path / "out"
    tiny_uae.save(str(out / "base"))
    first = M.UAE.load(str(out / "base"))
    for p in first.add_lora("llm", r=4, alpha=8, targets=LLM_LORA_TARGETS):
        torch.nn.init.normal_(p, std=0.05)
    first.save(str(out / "enc"), trained=("llm",))
    assert not (out / "enc" / "llm").exists() and (out / "enc" / "lora_llm" / "lora.safetensors").exists()
    assert json.loads((out / "enc" / "model.json").read_text())["adapters"] == {"llm": ["lora_llm"]}
    second = M.UAE.load(str(out / "enc"))
    with lora.lora_merged(first.llm):
        expected_llm = {k: v.clone() for k, v in first.llm.state_dict().items()}
    assert all(torch.equal(expected_llm[k], v) for k, v in second.llm.state_dict().items())  # bit for bit
    for p in second.add_lora("transformer", r=4, alpha=8, targets=M.DIT_LORA_TARGETS):
        torch.nn.init.normal_(p, std=0.05)
    second.save(str(out / "dec"), trained=("transformer",))
    meta = json.loads((out / "dec" / "model.json").read_text())
    assert meta["adapters"] == {"llm": [os.path.join("..", "enc", "lora_llm")], "transformer": ["lora_transformer"]}
    assert meta["parts"]["llm"] == os.path.join("..", "base", "llm") and not (out / "dec" / "transformer").exists()
    with lora.lora_merged(second.transformer):
        expected_dit = {k: v.clone() for k, v in second.transformer.state_dict().items()}
    shutil.move(str(out), str(tmp_path / "moved"))
    third = M.UAE.load(str(tmp_path / "moved" / "dec"))
    assert all(torch.equal(expected_llm[k], v) for k, v in third.llm.state_dict().items())
    assert all(torch.equal(expected_dit[k], v) for k, v in third.transformer.state_dict().items())
    (tmp_path / "moved" / "enc" / "lora_llm" / "lora.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="enc/lora_llm/lora.safetensors: adapter missing"):
        M.UAE.load(str(tmp_path / "moved" / "dec"))


def test_missing_directories_are_named(paper_dirs, tmp_path):
    qwen_dir, sd3_dir = paper_dirs
    missing = str(tmp_path / "no_such_qwen")
    with pytest.raises(FileNotFoundError, match="no_such_qwen"):
        M.UAE.from_pretrained(missing, sd3_dir, dtype=torch.float32)
    missing = str(tmp_path / "no_such_sd3")
    with pytest.raises(FileNotFoundError, match="no_such_sd3"):
        M.UAE.from_pretrained(qwen_dir, missing, dtype=torch.float32)
    # a checkpoint whose referenced part has moved away names the part and the path
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    parts = {"llm": qwen_dir, "processor": qwen_dir, "transformer": str(tmp_path / "moved_transformer"),
             "vae": os.path.join(sd3_dir, "vae"), "scheduler": os.path.join(sd3_dir, "scheduler")}
    (ckpt / "model.json").write_text(json.dumps({"parts": parts, "projector_hidden": 32, "max_text_tokens": 16,
                                                 "caption_prompt": "x"}))
    with pytest.raises(FileNotFoundError, match="'transformer'.*moved_transformer"):
        M.UAE.load(str(ckpt))


# ----------------------------------------------------------------------------- grpo_encoder

def _grpo_encoder_args(world, out):
    return [f"--data_dir={world}", f"--init_from={world / 'dec'}", f"--out_dir={out}", "--images_per_step=2",
            "--group_size=3", "--max_new_tokens=8", "--decode_steps=2", "--probe_n=4", "--eval_interval=2",
            "--save_interval=2", "--lora_r=4", "--lora_alpha=8", "--compile=False", f"--reward_backbone=open_clip:ShapesCLIP:{world / 'shapes_clip.pt'}"]


def test_grpo_encoder_steps_resume_and_peft_layout(tiny_world, capsys, tmp_path):
    import grpo_encoder
    from safetensors.torch import load_file
    out = tmp_path / "genc"
    capsys.readouterr()
    grpo_encoder.main(_grpo_encoder_args(tiny_world, out) + ["--max_steps=2", "--threads=2"])
    text = capsys.readouterr().out
    assert "step 2 reward" in text and "eval step 2" in text and "zero_std" in text
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(-1 <= r["reward_mean"] <= 1 for r in rows)
    assert rows[0]["drift"] == 0 and rows[1]["drift"] > 0  # B = 0 at step 1: the policy conditions like the reference
    assert (out / "reward_curve.png").exists() and (out / "lora_llm" / "adapter_config.json").exists()
    assert any(k.endswith("q_proj.lora_B.weight") for k in load_file(out / "lora_llm" / "adapter_model.safetensors"))
    # the adapter belongs on the weights it was trained on, not on out/llm, where it is already merged in
    adapter_base = json.loads((out / "lora_llm" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert adapter_base == os.path.abspath(M.UAE.load(str(tiny_world / "dec")).sources["llm"])
    assert adapter_base != os.path.abspath(out / "llm")
    # the reference model (adapters off) equals the checkpoint the run started from
    base = M.UAE.load(str(tiny_world / "dec")).eval()
    policy = M.UAE.load(str(tiny_world / "dec")).eval()
    policy.add_lora("llm", 4, 8, LLM_LORA_TARGETS)
    lora.load_lora(policy.llm, str(out / "lora_llm"))
    images, _ = _scene_images(2)
    with torch.no_grad():
        c = base.caption(images, greedy=True, max_new_tokens=6)
        with lora.lora_disabled(policy.llm):
            torch.testing.assert_close(policy.caption_logprobs(c.prompt, c.ids), base.caption_logprobs(c.prompt, c.ids))
        # and the saved merged LLM equals the adapted policy
        merged = M.UAE.load(str(out)).eval()
        torch.testing.assert_close(merged.caption_logprobs(c.prompt, c.ids), policy.caption_logprobs(c.prompt, c.ids),
                                   atol=1e-4, rtol=1e-4)
    grpo_encoder.main(_grpo_encoder_args(tiny_world, out) + ["--max_steps=3", "--threads=2"])
    text = capsys.readouterr().out
    assert "at step 2" in text and "step 3 reward" in text
    assert len((out / "log.jsonl").read_text().splitlines()) == 3


def test_bench_reports_time_memory_and_mfu(tiny_world, capsys):
    import bench
    capsys.readouterr()
    bench.main([f"--init_from={tiny_world / 'dec'}", f"--data_dir={tiny_world}", "--kinds=encoder", "--steps=2", "--threads=2",
                f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}",
                "--encoder_args=--images_per_step=2 --group_size=3 --max_new_tokens=8 --decode_steps=2 --lora_r=4 --lora_alpha=8"])
    lines = [json.loads(l) for l in capsys.readouterr().out.splitlines() if l.startswith("{")]
    assert lines[0]["matmul_peak_gflops_bfloat16"] > 0
    row = lines[1]
    assert row["kind"] == "encoder" and row["samples_per_step"] == 6
    assert set(row["median_seconds_per_step"]) >= {"seconds", "t_caption", "t_decode", "t_reward", "t_policy"}
    assert row["gflops_per_step"] > 0 and 0 < row["mfu"] < 1  # a step above the matmul peak would be a counting bug
    assert 100 < row["peak_memory_mb"] < 24 * 1024  # a whole process: torch alone takes a few hundred MB


def _policy_with_random_lora(world, part: str, targets: list[str], std: float):
    """The tiny world's decoder checkpoint with LoRA on `part`, its A and B random (B = 0 at init would
    leave A without gradient), and the world's reward: what a GRPO update test needs."""
    from common import setup_runtime
    from reward import ReconstructionReward, load_backbone
    rt = setup_runtime("cpu", "float32", 0)
    model = M.UAE.load(str(world / "dec"))
    model.requires_grad_(False)
    params = model.add_lora(part, 4, 8, targets)
    with torch.no_grad():
        for p in params:
            p.normal_(std=std)
    return rt, model, params, ReconstructionReward(load_backbone(f"open_clip:ShapesCLIP:{world / 'shapes_clip.pt'}", rt.device))


def test_grpo_encoder_micro_batches_give_the_whole_batch_gradient(tiny_world):
    """Captions.rows cuts a rollout's prompt (pixel patches at their offsets) so that micro-batches of
    captions score as they do in the whole batch, and their losses add up to the whole batch's gradient,
    also with the LLM's layers recomputed in the backward (grad_checkpointing)."""
    import grpo_encoder
    from configurator import configure
    rt, model, params, reward_fn = _policy_with_random_lora(tiny_world, "llm", LLM_LORA_TARGETS, 0.05)
    cfg = configure(grpo_encoder.config, ["--group_size=3", "--max_new_tokens=8", "--decode_steps=2", "--compile=False"])
    out = grpo_encoder.rollout(model, rt, reward_fn, load_images(read_jsonl(str(tiny_world / "train.jsonl"))[:2]), [0, 1], cfg)
    captions = out["captions"]
    with torch.no_grad():
        whole = model.caption_logprobs(captions.prompt, captions.ids)
        part = captions.rows(slice(2, 5))
        torch.testing.assert_close(model.caption_logprobs(part.prompt, part.ids), whole[2:5], atol=1e-5, rtol=1e-4)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, -1.2, 0.9])
    grads = []
    for micro, checkpointing in ((0, False), (4, False), (4, True)):  # chunks of 4 and 2 captions
        checkpoint_llm_layers(model.llm, checkpointing)
        opt = torch.optim.SGD(params, lr=0.0)
        stats = grpo_encoder.policy_step(model, rt, opt, params, out, advantages, configure(grpo_encoder.config, [
            "--group_size=3", f"--micro_batch={micro}"]))
        assert stats["finite"]
        grads.append([p.grad.clone() for p in params])
    assert any(g.abs().max() > 0 for g in grads[0])
    for whole_grad, split, recomputed in zip(*grads):
        torch.testing.assert_close(split, whole_grad, atol=1e-6, rtol=1e-4)
        assert torch.equal(recomputed, split)


def test_grpo_encoder_drift_anchor_per_micro_batch_gives_the_whole_set_gradient(tiny_world, monkeypatch):
    """The drift anchor runs and backpropagates with each micro-batch (its captions' rows; the "" with the
    last): its gradient and value equal the whole anchor set's, conditioned in one pass and backpropagated
    once as before (advantages 0 and beta 0 leave the anchor alone in the gradient), while no pass with
    gradients conditions more than a micro-batch's texts (+ the "")."""
    import grpo_encoder
    from configurator import configure
    rt, model, params, reward_fn = _policy_with_random_lora(tiny_world, "llm", LLM_LORA_TARGETS, 0.05)
    cfg = configure(grpo_encoder.config, ["--group_size=3", "--max_new_tokens=8", "--decode_steps=2", "--compile=False"])
    out = grpo_encoder.rollout(model, rt, reward_fn, load_images(read_jsonl(str(tiny_world / "train.jsonl"))[:2]), [0, 1], cfg)
    assert len(out["anchor_texts"]) == 7
    model.zero_grad(set_to_none=True)
    with rt.autocast():  # the anchor as it was: the whole set at once
        whole = condition_drift(model.condition(out["anchor_texts"], allow_cut=True), out["reference_condition"])
    (2.0 * whole).backward()
    expected = [p.grad.clone() for p in params]
    assert whole > 0 and any(g.abs().max() > 0 for g in expected)
    sizes, real = [], M.UAE.condition
    monkeypatch.setattr(M.UAE, "condition", lambda self, texts, *a, **k: (
        sizes.append(len(texts)) if torch.is_grad_enabled() else None, real(self, texts, *a, **k))[1])
    for micro, passes in ((0, [7]), (4, [4, 3]), (1, [1, 1, 1, 1, 1, 2])):
        sizes.clear()
        opt = torch.optim.SGD(params, lr=0.0)
        stats = grpo_encoder.policy_step(model, rt, opt, params, out, torch.zeros(6), configure(grpo_encoder.config, [
            "--group_size=3", f"--micro_batch={micro}", "--beta=0", "--anchor_weight=2.0", "--grad_clip=1e9"]))
        assert stats["finite"] and sizes == passes  # texts per conditioning pass with gradients
        torch.testing.assert_close(stats["drift"], whole.detach(), atol=1e-7, rtol=1e-5)
        for g, ref in zip((p.grad for p in params), expected):
            torch.testing.assert_close(g, ref, atol=1e-7, rtol=1e-4)


def test_grpo_encoder_two_process_gloo_resumes_exactly(tiny_world, tmp_path):
    from safetensors.torch import load_file

    def run(out, steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(REPO, "grpo_encoder.py")] + _grpo_encoder_args(tiny_world, out) + \
            [f"--max_steps={steps}", "--threads=1", "--save_interval=1", "--eval_interval=100"]
        result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    out = run(tmp_path / "g2", 2)
    assert out.count("step 1 reward") == 1  # only rank 0 prints
    state = common.load_training_state(str(tmp_path / "g2"))
    assert state["step"] == 2
    # one RNG state per rank, each rank's own (seed + rank): a resumed run must not hand rank 0's to both
    assert len(state["rng"]) == 2 and not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    run(tmp_path / "g2r", 1)
    assert "resumed from" in run(tmp_path / "g2r", 2)
    continuous, resumed = (load_file(str(tmp_path / d / "lora_llm" / "lora.safetensors")) for d in ("g2", "g2r"))
    assert continuous and continuous.keys() == resumed.keys()
    assert all(torch.equal(continuous[k], resumed[k]) for k in continuous)  # bit for bit


# ----------------------------------------------------------------------------- cold start

def test_cold_start_conditions_the_decoder_on_caption_text_only(tiny_world):
    """The auto-encoder's latent is text: two different images whose sampled captions are identical give
    identical decoder conditioning, though the captioning passes saw different images."""
    import cold_start
    model = M.UAE.load(str(tiny_world / "dec")).eval()
    images = load_images(read_jsonl(str(tiny_world / "train.jsonl"))[:2])
    assert not torch.equal(images[0], images[1])
    with torch.no_grad():
        caps = model.caption(images, 1, greedy=True)
        same = Captions(caps.prompt, caps.ids[:1].repeat(2, 1), caps.mask[:1].repeat(2, 1), [caps.texts[0]] * 2)
        cond = cold_start.decoder_condition(model, same)
        # the channel the bottleneck closes: the captioning pass's states at the caption tokens differ
        n = same.ids.shape[1]
        inputs = dict(same.prompt, input_ids=torch.cat([same.prompt["input_ids"], same.ids], 1),
                      attention_mask=torch.cat([same.prompt["attention_mask"], torch.ones_like(same.ids)], 1))
        if "mm_token_type_ids" in same.prompt:
            inputs["mm_token_type_ids"] = torch.cat([same.prompt["mm_token_type_ids"], torch.zeros_like(same.ids)], 1)
        seen = model.llm(**inputs, output_hidden_states=True).hidden_states[-1][:, -n:]
    assert cond.shape == (2, model.max_text_tokens, model.transformer.config.joint_attention_dim)
    assert torch.equal(cond[0], cond[1]) and not torch.allclose(seen[0], seen[1])


def test_cold_start_micro_batches_and_checkpointing_give_the_whole_batch_gradient(tiny_world):
    """cold_start.backward over micro-batches of images (4: each term backpropagated on its own; 3 + 1: uneven
    shares, the "" anchor with the last), with and without checkpointing (DiT blocks through the differentiable
    sampler, VAE decoder blocks, the LLM's layers in its three passes with gradients), gives the whole batch's
    loss and gradients on the adapters, projector and DiT (fp32)."""
    import cold_start
    from configurator import configure
    rt, model, adapters, reward_fn = _policy_with_random_lora(tiny_world, "llm", LLM_LORA_TARGETS, 0.05)
    decoder = [p for m in model.decoder_modules() for p in m.parameters()]
    for p in decoder:
        p.requires_grad_(True)
    records = read_jsonl(str(tiny_world / "train.jsonl"))[:4]
    x = load_images(records)
    with torch.no_grad():
        captions = model.eval().caption(x, 1, 0.7, 8)
        anchor_texts = [r["caption"] for r in records] + [""]
        with lora.lora_disabled(model.llm):
            reference = model.condition(anchor_texts)
    model.train()
    noise = torch.randn(model.latent_shape(4))
    source = reward_fn.source_features(x.float().div(255), [0, 1, 2, 3])
    results, block_calls, vae_calls, llm_calls = [], [], [], []
    hooks = [model.transformer.transformer_blocks[0].register_forward_pre_hook(lambda *_: block_calls.append(1)),
             model.vae.decoder.up_blocks[-1].register_forward_pre_hook(lambda *_: vae_calls.append(1)),
             model.llm.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: llm_calls.append(1))]
    for micro, checkpointing in ((0, False), (4, False), (3, False), (3, True)):
        if checkpointing:
            cold_start.checkpoint_activations(model)
        model.zero_grad(set_to_none=True)
        block_calls.clear(), vae_calls.clear(), llm_calls.clear()
        cfg = configure(cold_start.config, ["--sample_steps=2", f"--micro_batch={micro}", "--ce_weight=0.5", "--anchor_weight=3.0"])
        stats = cold_start.backward(model, rt, reward_fn.backbone, captions, source, anchor_texts, reference, noise, cfg)
        results.append((stats, [p.grad.clone() for p in adapters + decoder]))
        parts, recompute = len(common.micro_slices(4, micro)), (2 if checkpointing else 1)
        assert len(block_calls) == 2 * parts * recompute and len(vae_calls) == parts * recompute  # (sampler steps x) parts
        assert len(llm_calls) == 3 * parts * recompute  # log-probs, conditioning, anchor
    for hook in hooks:
        hook.remove()
    (whole, whole_grads), parts = results[0], results[1:]
    assert whole["drift"] > 0 and all(g.abs().max() > 0 for g in (whole_grads[0], whole_grads[-1]))  # adapters and DiT both learn
    for stats, grads in parts:
        for k in whole:
            torch.testing.assert_close(stats[k], whole[k], atol=1e-6, rtol=1e-5)
        for g, ref in zip(grads, whole_grads):
            torch.testing.assert_close(g, ref, atol=1e-6, rtol=1e-4)


def test_condition_drift_by_hand():
    ref = torch.tensor([[[1.0, -1.0], [2.0, 0.0]]])  # mean square 6 / 4 = 1.5
    assert condition_drift(ref, ref).item() == 0.0
    moved = ref + torch.tensor([[[0.5, 0.5], [-1.0, 0.0]]])  # mean square error (0.25 + 0.25 + 1) / 4 = 0.375
    assert condition_drift(moved.bfloat16(), ref).item() == pytest.approx(0.375 / 1.5)
    assert condition_drift(moved, ref).dtype == torch.float32


def test_cold_start_trains_all_three_and_resumes(tiny_world, capsys, tmp_path):
    import cold_start
    out = tmp_path / "cold"
    args = [f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'dec'}", f"--out_dir={out}", "--batch_size=4",
            "--sample_steps=2", "--max_new_tokens=8", "--log_interval=1", "--save_interval=2", "--lora_r=4",
            "--lora_alpha=8", "--lr_lora=1e-2", "--lr_decoder=1e-2", "--threads=2",
            f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]
    capsys.readouterr()
    cold_start.main(args + ["--max_steps=2"])
    text = capsys.readouterr().out
    assert "step 2 loss" in text and float(text.split("step 2 loss")[1].split(" drift ")[1].split()[0]) > 0
    before, after = M.UAE.load(str(tiny_world / "dec")), M.UAE.load(str(out))
    changed = lambda a, b: any(not torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert changed(before.transformer, after.transformer) and changed(before.projector, after.projector)
    assert changed(before.llm.model.language_model, after.llm.model.language_model)  # LoRA merged in
    assert not changed(before.llm.model.visual, after.llm.model.visual) and not changed(before.vae, after.vae)
    cold_start.main(args + ["--max_steps=3"])
    text = capsys.readouterr().out
    assert "at step 2" in text and "step 3 loss" in text
    with pytest.raises(ValueError, match="max_text_tokens"):  # captions the decoder could not read: refused up front
        cold_start.main(args + [f"--out_dir={tmp_path / 'long'}", "--max_new_tokens=64"])


# ----------------------------------------------------------------------------- eval_unified

RELEASED_KEYS = {"model_types", "similarities_by_model", "statistics_by_model", "summary"}  # Score_i2i.py's results
STATISTICS_KEYS = {"total_images", "valid_pairs", "average_similarity", "min_similarity", "max_similarity"}
SUMMARY_KEYS = {"models_used", "average_scores_by_model", "overall_average", "best_model", "worst_model"}


def released_features(kind, path, files):
    """The released scorer's CLIP / DINOv2 scorers step by step, one image at a time: the file as a PIL RGB
    image -> the model's image processor (PIL: transformers 4's default) -> get_image_features or the CLS
    token of last_hidden_state -> L2 normalise."""
    from PIL import Image
    from transformers import BitImageProcessorPil, CLIPImageProcessorPil, CLIPModel, Dinov2Model
    processor = (CLIPImageProcessorPil if kind == "clip" else BitImageProcessorPil).from_pretrained(path)
    model = (CLIPModel if kind == "clip" else Dinov2Model).from_pretrained(path).eval()
    feats = []
    with torch.no_grad():
        for f in files:
            inputs = processor(images=Image.open(f).convert("RGB"), return_tensors="pt")
            if kind == "clip":
                out = model.get_image_features(**inputs)
                out = out if torch.is_tensor(out) else out.pooler_output  # a tensor before transformers 5
            else:
                out = model(**inputs).last_hidden_state[:, 0, :]
            feats.append(F.normalize(out, p=2, dim=1))
    return feats


def test_eval_unified_hf_judges_match_the_released_scorer(shapes_clip, shapes_clip_file, tmp_path, capsys):
    import eval_unified
    from PIL import Image
    save_clip(tmp_path / "clip"), save_dinov2(tmp_path / "dinov2")
    refs, gens = tmp_path / "refs", tmp_path / "gens"
    refs.mkdir(), gens.mkdir()
    rng = np.random.default_rng(0)
    image = lambda h, w, c=3: Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8))
    # sources of different sizes (one RGBA), reconstructions matched by name, by stem (another extension),
    # by recon_<stem>, and none for d.png; zz.png matches no source
    image(50, 70).save(refs / "a.png"), image(40, 40).save(refs / "b.jpg"), image(64, 48, 4).save(refs / "c.png")
    image(36, 60).save(refs / "d.png")
    image(48, 48).save(gens / "a.png"), image(30, 44).save(gens / "b.png"), image(48, 48, 4).save(gens / "recon_c.webp")
    image(48, 48).save(gens / "zz.png")
    pairs = {"a.png": "a.png", "b.jpg": "b.png", "c.png": "recon_c.webp"}
    results = eval_unified.evaluate(eval_unified.configure(eval_unified.config, [
        f"--generated={gens}", f"--references={refs}", f"--out_dir={tmp_path / 'ev'}", f"--clip=hf:{tmp_path / 'clip'}",
        f"--dinov2=hf:{tmp_path / 'dinov2'}", "--longclip=", f"--reward_backbone=open_clip:ShapesCLIP:{shapes_clip_file}",
        "--batch_size=2"]))
    out = capsys.readouterr().out
    assert "judge longclip: not configured, skipped" in out and "judge dinov3: not configured, skipped" in out
    assert f"1 of 4 images of {refs} have no reconstruction in {gens}" in out
    expected = {}
    for kind in ("clip", "dinov2"):
        src = released_features(kind, tmp_path / kind, [refs / n for n in pairs])
        rec = released_features(kind, tmp_path / kind, [gens / g for g in pairs.values()])
        expected[kind] = {n: torch.cosine_similarity(s, r, dim=1).item() for n, s, r in zip(pairs, src, rec)}
    saved = json.loads((tmp_path / "ev" / "results.json").read_text())
    assert set(saved) == RELEASED_KEYS | {"unified_score", "unified_score_per_image", "reward_cosine",
                                          "reward_cosine_per_image", "config"}
    assert saved["model_types"] == ["clip", "dinov2"] and set(saved["similarities_by_model"]) == {"clip", "dinov2"}
    for kind in ("clip", "dinov2"):
        got = saved["similarities_by_model"][kind]
        assert list(got) == ["a.png", "b.jpg", "c.png", "d.png"] and got["d.png"] is None
        assert [got[n] for n in pairs] == pytest.approx(list(expected[kind].values()), abs=1e-5)
        stats = saved["statistics_by_model"][kind]
        assert set(stats) == STATISTICS_KEYS and (stats["total_images"], stats["valid_pairs"]) == (4, 3)
        e = list(expected[kind].values())
        assert [stats["average_similarity"], stats["min_similarity"], stats["max_similarity"]] == pytest.approx(
            [np.mean(e), min(e), max(e)], abs=1e-5)
    averages = {k: np.mean(list(v.values())) for k, v in expected.items()}
    summary = saved["summary"]
    assert set(summary) == SUMMARY_KEYS and summary["models_used"] == ["clip", "dinov2"]
    assert summary["average_scores_by_model"] == pytest.approx(averages, abs=1e-5)
    assert summary["overall_average"] == pytest.approx(np.mean(list(averages.values())), abs=1e-5)
    best, worst = max(averages, key=averages.get), min(averages, key=averages.get)
    assert summary["best_model"][0] == best and summary["worst_model"][0] == worst
    assert summary["best_model"][1] == pytest.approx(averages[best], abs=1e-5)
    assert saved["unified_score"] == pytest.approx(100 * summary["overall_average"], abs=1e-9)
    assert saved["unified_score_per_image"] == pytest.approx(
        {n: 100 * (expected["clip"][n] + expected["dinov2"][n]) / 2 for n in pairs}, abs=1e-3)
    # the reward backbone: scored alike (open_clip's own transform per image), reported apart
    embed = lambda path: reference_clip(shapes_clip, [torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1) / 255])
    reward = {n: cosine(embed(refs / n), embed(gens / g)).item() for n, g in pairs.items()}
    assert saved["reward_cosine_per_image"] == pytest.approx(reward, abs=1e-5)
    assert saved["reward_cosine"] == pytest.approx(np.mean(list(reward.values())), abs=1e-5)
    assert json.loads(json.dumps(results)) == saved  # what evaluate returns is what it wrote
    assert "on 3/4 images" in eval_unified.summary(results) and "reward backbone cosine" in eval_unified.summary(results)
    for f in ("a.png", "b.png", "recon_c.webp"):  # no source matched at all: an error naming both folders
        (gens / f).unlink()
    with pytest.raises(DataError, match=f"no image of {gens} matches any of the 4 images of {refs}"):
        eval_unified.evaluate(eval_unified.configure(eval_unified.config, [
            f"--generated={gens}", f"--references={refs}", f"--out_dir={tmp_path / 'ev'}",
            f"--clip=hf:{tmp_path / 'clip'}", "--longclip=", "--dinov2=", "--reward_backbone="]))


def test_eval_unified_open_clip_judge_and_no_judge(tiny_world, tmp_path):
    import eval_unified
    import open_clip
    from PIL import Image
    refs, gens = tmp_path / "refs", tmp_path / "gens"
    refs.mkdir(), gens.mkdir()
    rng = random.Random(3)
    pairs = []
    for i in range(3):
        a, b = shapes.render(shapes.sample_scene(rng)), shapes.render(shapes.sample_scene(rng))
        Image.fromarray(a).save(refs / f"{i}.png"), Image.fromarray(b).save(gens / f"{i}.png")
        pairs.append((a, b))
    args = [f"--generated={gens}", f"--references={refs}", f"--out_dir={tmp_path / 'ev'}", "--longclip=", "--dinov2=",
            "--reward_backbone="]
    results = eval_unified.evaluate(eval_unified.configure(eval_unified.config, args + [
        f"--clip=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]))
    # independent: open_clip's own model + its own preprocessing (48x48 input, normalise) + plain cosine
    open_clip.add_model_config(os.path.join(REPO, "config", "open_clip"))
    clip = open_clip.create_model("ShapesCLIP", pretrained=str(tiny_world / "shapes_clip.pt")).eval()
    mean, std = torch.tensor(clip.visual.preprocess_cfg["mean"]).view(3, 1, 1), torch.tensor(clip.visual.preprocess_cfg["std"]).view(3, 1, 1)
    embed = lambda im: clip.encode_image(((torch.from_numpy(im).permute(2, 0, 1) / 255 - mean) / std)[None])[0]
    with torch.no_grad():
        expected = [F.cosine_similarity(embed(a), embed(b), dim=0).item() for a, b in pairs]
    got = results["similarities_by_model"]["clip"]
    assert [got[f"{i}.png"] for i in range(3)] == pytest.approx(expected, abs=1e-5)
    assert results["unified_score"] == pytest.approx(100 * np.mean(expected), abs=1e-3)
    assert results["reward_cosine"] is None and results["reward_cosine_per_image"] is None
    with pytest.raises(ValueError, match="no judge configured"):
        eval_unified.evaluate(eval_unified.configure(eval_unified.config, args + ["--clip="]))


def test_paired_difference_by_hand():
    import eval_unified
    # t quantiles t_{0.975, df} from the tables; df 1 and 2 in closed form: tan(0.475 pi), 0.95 / sqrt(0.04875)
    for df, t in ((1, math.tan(0.475 * math.pi)), (2, 0.95 / math.sqrt(0.04875)), (9, 2.2622), (29, 2.0452), (1000, 1.9623)):
        assert eval_unified.t_critical(df) == pytest.approx(t, abs=1e-4)
    # differences 1, 2, 4: mean 7/3, sd sqrt(7/3), t = sqrt(7), df 2 -> p = 1 - t / sqrt(2 + t^2) = 1 - sqrt(7) / 3
    r = eval_unified.paired_difference({"x": 0.0, "y": 0.0, "z": 0.0, "only_a": 5.0}, {"x": 1.0, "y": 2.0, "z": 4.0})
    half = 0.95 / math.sqrt(0.04875) * math.sqrt(7 / 3) / math.sqrt(3)
    assert r["n"] == 3 and r["mean"] == pytest.approx(7 / 3) and r["p"] == pytest.approx(1 - math.sqrt(7) / 3, abs=1e-9)
    assert r["ci95"] == pytest.approx([7 / 3 - half, 7 / 3 + half], abs=1e-6)
    # df 1 (Cauchy): p = 1 - 2 atan(|t|) / pi; differences 1, 3 -> mean 2, se 1, t 2
    assert eval_unified.paired_difference({"a": 0, "b": 0}, {"a": 1, "b": 3})["p"] == pytest.approx(1 - 2 * math.atan(2) / math.pi, abs=1e-9)
    assert eval_unified.paired_difference({"a": 1, "b": 2}, {"a": 1, "b": 2})["p"] == 1.0  # no difference at all
    assert eval_unified.paired_difference({"a": 1, "b": 2}, {"a": 2, "b": 3})["p"] == 0.0  # a constant shift
    with pytest.raises(ValueError, match="at least 2"):
        eval_unified.paired_difference({"a": 1}, {"a": 2, "b": 3})


def test_mcnemar_by_hand():
    import eval_unified
    # 1 image lost, 9 gained, 5 passed in both, 5 failed in both: p = 2 (1 + 10) / 2^10 = 0.021484
    a = {i: i < 6 for i in range(20)}
    b = {i: 1 <= i < 15 for i in range(20)}
    assert eval_unified.mcnemar(a, b) == pytest.approx({"n": 20, "lost": 1, "gained": 9, "p": 22 / 1024})
    assert eval_unified.mcnemar(b, a)["p"] == pytest.approx(0.02148, abs=1e-5)
    assert eval_unified.mcnemar(a, a) == {"n": 20, "lost": 0, "gained": 0, "p": 1.0}
    assert eval_unified.mcnemar({0: True, 1: False}, {0: False, 1: True})["p"] == 1.0  # 1 vs 1: capped at 1


def test_eval_unified_checkpoint_on_shapes_bench(tiny_world, tmp_path):
    import eval_unified
    save_clip(tmp_path / "clip"), save_dinov2(tmp_path / "dinov2")  # the fixture's world has no judges
    judges = [f"--clip=hf:{tmp_path / 'clip'}", f"--dinov2=hf:{tmp_path / 'dinov2'}", "--longclip=",
              f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]
    out = tmp_path / "ev"
    results = eval_unified.evaluate(eval_unified.configure(eval_unified.config, [
        f"--ckpt={tiny_world / 'dec'}", f"--data={tiny_world / 'bench.jsonl'}", f"--out_dir={out}", "--sample_steps=2",
        "--max_new_tokens=8", "--compile=False"] + judges))
    assert set(results) == RELEASED_KEYS | {"unified_score", "unified_score_per_image", "reward_cosine", "reward_cosine_per_image",
                                            "understanding", "generation", "generation_partial", "unification", "config"}
    assert set(results["understanding"]) == {"recall", "small_object_recall", "attribute_accuracy", "precision", "caption_length"}
    assert set(results["generation"]) == {"overall", "objects", "color", "shape", "size", "position", "count", "overall_3plus",
                                          "overall_per_image", "unified_score", "unified_score_per_image", "extra_objects",
                                          "extra_objects_per_image", "text_reliance", "text_reliance_per_image"}
    assert set(results["generation_partial"]) == {"satisfied", "mentioned_object_recall", "extra_objects", "objects_left_out",
                                                  "satisfied_per_image", "extra_objects_per_image"}
    assert set(results["unification"]) == {"unified_score", "reward_cosine", "scene_f1", "mentioned_object_recall",
                                           "captions_cut", "turns_cut", "unknown_word_captions"}
    assert results["model_types"] == ["clip", "dinov2"]
    assert all(s["total_images"] == s["valid_pairs"] == 8 for s in results["statistics_by_model"].values())
    assert len(os.listdir(out / "reconstructions")) == 8
    assert (out / "grid.png").exists() and len((out / "captions.jsonl").read_text().splitlines()) == 8
    # the tables are those of the written captions and scores, not just the right keys
    texts = [json.loads(l)["caption"] for l in (out / "captions.jsonl").read_text().splitlines()]
    report = shapes.caption_report(texts, shapes.scenes_of(read_jsonl(str(tiny_world / "bench.jsonl"))))
    assert results["understanding"] == pytest.approx(report, nan_ok=True)  # nan: an untrained encoder states nothing
    per_image = list(results["unified_score_per_image"].values())
    assert len(per_image) == 8 and results["unified_score"] == pytest.approx(np.mean(per_image)) == pytest.approx(
        100 * np.mean(list(results["summary"]["average_scores_by_model"].values())))
    assert results["unification"]["unified_score"] == results["unified_score"] and -1 <= results["reward_cosine"] <= 1
    gen = results["generation"]
    assert 0 <= results["unification"]["scene_f1"] <= 1 and all(0 <= gen[k] <= 1 for k in shapes.GENERATION_CATEGORIES)
    assert gen["overall"] == np.mean(list(gen["overall_per_image"].values()))  # per-image exact matches, for McNemar
    assert gen["unified_score"] == pytest.approx(np.mean(list(gen["unified_score_per_image"].values())))
    recons = [load_image({"image_path": str(out / "reconstructions" / f), "where": f}) for f in sorted(os.listdir(out / "reconstructions"))]
    assert results["unification"]["mentioned_object_recall"] == pytest.approx(
        shapes.mentioned_object_recall(texts, recons), nan_ok=True)
    assert gen["extra_objects"] == np.mean(list(gen["extra_objects_per_image"].values())) and gen["text_reliance"] > 0
    partial = results["generation_partial"]
    assert partial["satisfied"] == np.mean(list(partial["satisfied_per_image"].values()))
    bench = read_jsonl(str(tiny_world / "bench.jsonl"))
    assert partial["objects_left_out"] == np.mean([len(r["scene"]) - len(shapes.parse_caption(r["partial_caption"])) for r in bench]) > 0
    rows = eval_unified.decoder_comparison(results, results, {os.path.basename(bench[0]["image"])})  # a model against itself: nothing changes
    assert all(r["before"] == r["after"] for r in rows.values()) and rows["geneval_shapes"]["p"] == 1.0
    tok = shapes.build_tokenizer()  # a caption stopped by the 8-token cap has 8 tokens and no eos
    assert results["unification"]["captions_cut"] == sum(len(tok(t, add_special_tokens=False)["input_ids"]) >= 8 for t in texts)
    clash = tmp_path / "clash.jsonl"  # reconstructions are stored as <stem>.png: two sources may not share one
    clash.write_text('{"image": "a/0.png", "caption": "x"}\n{"image": "b/0.jpg", "caption": "y"}\n')
    with pytest.raises(DataError, match=r"clash.jsonl:2: image file name 0.jpg gives reconstruction 0.png, as .*clash.jsonl:1 does"):
        eval_unified.evaluate(eval_unified.configure(eval_unified.config, [
            f"--ckpt={tiny_world / 'dec'}", f"--data={clash}", f"--out_dir={out}"] + judges))


# ----------------------------------------------------------------------------- grpo_decoder

def test_grpo_decoder_on_policy_step_and_resume(tiny_world, capsys, tmp_path):
    import grpo_decoder
    from safetensors.torch import load_file
    out = tmp_path / "gdec"
    args = [f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'dec'}", f"--out_dir={out}", "--captions_per_step=2",
            "--group_size=3", "--max_new_tokens=8", "--train_steps=4", "--eval_steps=2", "--eval_n=4",
            "--eval_interval=2", "--save_interval=2", "--lora_r=4", "--lora_alpha=8", "--threads=2",
            f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"]
    capsys.readouterr()
    grpo_decoder.main(args + ["--max_steps=2"])
    text = capsys.readouterr().out
    error = float(text.split("max |ratio - 1| = ")[1].split()[0])
    assert error <= 1e-5 and "(<= 1e-5: ok)" in text, text  # recomputed log-probs equal the sampled ones before any update
    assert "eval step 0 overall" in text and "step 2 reward" in text and "eval step 2 overall" in text
    assert (out / "lora_transformer" / "adapter_model.safetensors").exists() and (out / "reward_curve.png").exists()
    # the update moved the policy: LoRA B starts at 0, so step 1's KL is 0 and step 2's is not
    rows = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == 0 and rows[1]["kl"] > 0, rows
    adapters = load_file(str(out / "lora_transformer" / "adapter_model.safetensors"))
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items()), list(adapters)
    grpo_decoder.main(args + ["--max_steps=3"])
    text = capsys.readouterr().out
    assert "at step 2" in text and "step 3 reward" in text
    assert [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()] == [1, 2, 3]
    with pytest.raises(ValueError, match=r"another config: shared_noise False there, True now\. .*--resume=False"):
        grpo_decoder.main(args + ["--max_steps=4", "--shared_noise=True"])  # the saved run's settings are binding
    grpo_decoder.main(args + [f"--out_dir={tmp_path / 'shared'}", "--max_steps=1", "--shared_noise=True", "--advantage_std=batch"])
    assert "step 1 reward" in capsys.readouterr().out
    with pytest.raises(ValueError, match="advantage_std"):
        grpo_decoder.main(args + [f"--out_dir={tmp_path / 'bad'}", "--advantage_std=global"])


def test_grpo_decoder_micro_batches_give_the_whole_batch_gradient(tiny_world):
    """The update in chunks of trajectories (micro_batch) sums to the gradient of the whole batch's update."""
    import grpo_decoder
    from configurator import configure
    cfg = configure(grpo_decoder.config, ["--group_size=3", "--max_new_tokens=8", "--train_steps=4", "--timestep_fraction=1.0"])
    rt, model, params, reward_fn = _policy_with_random_lora(tiny_world, "transformer", M.DIT_LORA_TARGETS, 0.1)
    images = load_images(read_jsonl(str(tiny_world / "train.jsonl"))[:2])
    out = grpo_decoder.rollout(model, rt, reward_fn, images, [0, 1], cfg)
    advantages = torch.tensor([1.0, -0.5, -0.5, 0.3, -1.2, 0.9])
    opt = torch.optim.SGD(params, lr=0.0)  # the update leaves the gradients in .grad and the weights as they were
    grads = []
    for chunks in ([slice(0, 6)], [slice(0, 4), slice(4, 6)]):
        torch.manual_seed(0)  # the same timesteps chosen
        stats = grpo_decoder.policy_step(model, rt, opt, params, out | {"chunks": chunks}, advantages, cfg, check_on_policy=True)
        assert stats["finite"] and stats["max_ratio_error"] < 1e-5
        grads.append([p.grad.clone() for p in params])
    assert any(g.abs().max() > 0 for g in grads[0])
    for whole, split in zip(*grads):
        torch.testing.assert_close(split, whole, atol=1e-6, rtol=1e-4)


def test_decoder_kl_is_the_gaussian_mean_difference(tiny_uae):
    """grpo.step_kl, grpo_decoder's KL term: KL(N(mu, s^2) || N(mu_ref, s^2)) per dimension =
    (mu - mu_ref)^2 / (2 s^2). Checked on a hand-computed case, then on the step Gaussians of a
    LoRA-perturbed DiT against its reference (adapters off) by torch.distributions."""
    # hand case: sample 0 differs by (1, 2) with s = 0.5 -> (1 + 4) / 2 / (2 * 0.25) = 5; sample 1 is equal
    mean, ref = torch.tensor([[[1.0, 3.0]], [[2.0, 2.0]]]), torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    torch.testing.assert_close(step_kl(mean, ref, torch.tensor(0.5).view(1, 1, 1)), torch.tensor([5.0, 0.0]))
    import copy
    model = copy.deepcopy(tiny_uae)
    params = model.add_lora("transformer", 4, 8, M.DIT_LORA_TARGETS)
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 0.05)
        cond = model.condition(["a red circle.", "a blue square."])
        sigmas = model.sigmas(4)
        x = torch.randn(model.latent_shape(2))
        _, _, mean, step_std = model.sde_transition(x, sigmas[1], sigmas[2], cond, None, 1.0, 0.7, sigmas[1])
        with lora.lora_disabled(model.transformer):
            _, _, ref_mean, _ = model.sde_transition(x, sigmas[1], sigmas[2], cond, None, 1.0, 0.7, sigmas[1])
    s = step_std.flatten()[0]
    assert s == pytest.approx(0.7 * math.sqrt(sigmas[1] / (1 - sigmas[1])) * math.sqrt(sigmas[1] - sigmas[2]))
    exact = torch.distributions.kl_divergence(torch.distributions.Normal(mean, s), torch.distributions.Normal(ref_mean, s))
    kl = step_kl(mean, ref_mean, step_std)
    torch.testing.assert_close(kl, exact.flatten(1).mean(1))
    assert kl.shape == (2,) and (kl > 0).all()


# ----------------------------------------------------------------------------- Unified-Bench Protocol 2 (eval_pairwise)

def _pairwise_inputs(root, candidate, baseline, scenes=None, protocol1=None):
    """Sources (with scenes when given), the two captions files as eval_unified writes them, and with
    `protocol1` ((candidate, baseline) scores per image) a results.json beside each; the argv for main."""
    names = [f"{i:03d}.png" for i in range(len(candidate))]
    with open(root / "data.jsonl", "w") as f:
        for i, name in enumerate(names):
            f.write(json.dumps({"image": f"images/{name}"} | ({"scene": [o.to_json() for o in scenes[i]]} if scenes else {})) + "\n")
    for side, texts in enumerate((candidate, baseline)):
        folder = root / ("cand", "base")[side]
        folder.mkdir()
        (folder / "captions.jsonl").write_text("".join(json.dumps({"image": n, "caption": t}) + "\n" for n, t in zip(names, texts)))
        if protocol1:
            (folder / "results.json").write_text(json.dumps({"unified_score_per_image": {n: s[side] for n, s in zip(names, protocol1)}}))
    return [f"--candidate={root / 'cand' / 'captions.jsonl'}", f"--baseline={root / 'base' / 'captions.jsonl'}",
            f"--data={root / 'data.jsonl'}", f"--out_dir={root / 'out'}"]


def test_pairwise_exact_judge_by_hand(tmp_path):
    import eval_pairwise as P
    O = shapes.Obj
    scene = shapes.canonical([O("top left", "red", "circle", "large"), O("center", "blue", "square", "small")])
    full, one = "a large red circle at the top left and a small blue square at the center.", "a red circle."
    assert P.exact_score(full, scene) == {"correct": 6, "wrong": 0, "score": 6}  # 2 objects + 2 sizes + 2 positions
    assert P.exact_score("a red circle and a green triangle.", scene) == {"correct": 1, "wrong": 1, "score": 0}
    assert P.exact_score("a small red circle at the bottom.", scene) == {"correct": 1, "wrong": 2, "score": -1}
    assert P.exact_score("some shapes.", scene) == {"correct": 0, "wrong": 0, "score": 0}
    candidate = [full, "a red circle and a green triangle.", "a small red circle at the bottom.", "a red circle at the top left."]
    baseline = [one, "some shapes.", "a blue square at the center.", "a large red circle."]
    # win 6 > 1; tie 0 = 0; loss -1 < 2; tie 2 = 2. Protocol 1 agrees on the win, not on the loss; equal elsewhere
    args = _pairwise_inputs(tmp_path, candidate, baseline, [scene] * 4, protocol1=[(80, 30), (50, 50), (75, 70), (60, 60)])
    results = P.main(args)
    j = results["judges"]["exact"]
    assert (j["win"], j["tie"], j["loss"], j["unparseable"]) == (1, 2, 1, 0)
    assert j["win_rate"] == 0.5 and j["decisive_win_rate"] == 0.5 and j["order_agreement"] == 1.0
    assert j["win_rate_ci95"] == pytest.approx(P.wilson(2, 4)) and results["mean_win_rate"] == 0.5
    assert j["protocol1_agreement"] == {"pairs": 2, "agree": 1, "rate": 0.5, "ci95": P.wilson(1, 2)}
    assert results["protocol1"] == {"candidate_higher": 2, "baseline_higher": 0, "equal": 2}
    per = results["per_image"]["exact"]
    assert [(per[n]["ab"], per[n]["ba"], per[n]["result"]) for n in sorted(per)] == [
        ("A", "B", "win"), ("TIE", "TIE", "tie"), ("B", "A", "loss"), ("TIE", "TIE", "tie")]  # the orders swap the letters
    assert results["exact_scores"]["002.png"] == {"candidate": {"correct": 1, "wrong": 2, "score": -1},
                                                 "baseline": {"correct": 2, "wrong": 0, "score": 2}}
    assert "| `exact` | 1 | 2 | 1 | 0 (0, 0) | 0.500 |" in (tmp_path / "out" / "results.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["judges"]["exact"]["win"] == 1
    assert P.wilson(5, 10) == pytest.approx([0.2366, 0.7634], abs=1e-4)  # the textbook value
    for reply, verdict in [("A", "A"), (" **b**.", "B"), ("tie", "TIE"), ("<think>A or B?</think>\nB", "B"),
                           ("Verdict: A", "A"), ("The answer is TIE.", "TIE"), ("A or B", None),
                           ("Caption A is better", None), ("", None), (None, None)]:
        assert P.parse_verdict(reply) == verdict, reply


def test_pairwise_bad_specs_and_inputs_name_what_is_wrong(tmp_path, monkeypatch):
    import eval_pairwise as P
    scene = (shapes.Obj("top", "red", "circle", "large"),)
    args = _pairwise_inputs(tmp_path, ["a red circle.", "x"], ["some shapes.", "y"], [scene] * 2)
    monkeypatch.delenv("PAIRWISE_UNSET_KEY", raising=False)
    for judges, error in [("exact,nope:x", "'nope:x'"), ("exact;exact", "twice"), (f"hf:{tmp_path / 'none'}", "no such directory"),
                          ("openai:http://127.0.0.1:9/v1|m|PAIRWISE_UNSET_KEY", "PAIRWISE_UNSET_KEY is not set"),
                          ("openai:ftp://host|m", "http"), (" ; ", "empty")]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            P.main(args + [f"--judges={judges}"])
    with pytest.raises(ConfigError, match="api_params"):
        P.main(args + ["--judges=openai:http://127.0.0.1:9/v1|m", "--api_params=[1]"])
    captions = tmp_path / "cand" / "captions.jsonl"
    good = captions.read_text()
    captions.write_text(good.splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=re.escape(f"{captions}:2: invalid JSON")):
        P.main(args)
    captions.write_text(good + good.splitlines()[0] + "\n")
    with pytest.raises(DataError, match=re.escape(f"{captions}:3: image 000.png again (first at {captions}:1)")):
        P.main(args)
    captions.write_text(good.splitlines()[0] + "\n")
    with pytest.raises(DataError, match=r"1 missing \['001.png'\]"):
        P.main(args)
    captions.write_text(good)
    (tmp_path / "data.jsonl").write_text(json.dumps({"image": "images/000.png"}) + "\n" + json.dumps({"image": "images/001.png"}) + "\n")
    with pytest.raises(DataError, match=r"data.jsonl:1 has no \"scene\""):
        P.main(args)


def _bigram_lm(path, following: dict):
    """A tiny Llama that is a bigram table: attention and MLP write nothing, so the last hidden state is
    the current token's embedding (one-hot), and lm_head maps it to the token `following` names (unnamed
    tokens give id 0, the pad). Saved with the shapes world's tokenizer and its chat template."""
    from transformers import LlamaConfig, LlamaForCausalLM
    tok = shapes.build_tokenizer()
    ids = tok.convert_tokens_to_ids
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.copy_(torch.eye(len(tok), 64))
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        for current, nxt in following.items():
            model.lm_head.weight[ids(nxt), ids(current)] = 1.0
    model.save_pretrained(path)
    tok.save_pretrained(path)


def test_pairwise_tiny_hf_judges_run_end_to_end(tmp_path):
    """Two local transformers judges through main(): one always answers 'a' (the first caption: position
    bias at its worst, so every pair ties and the orders never agree), one answers 'red' (unparseable,
    asked again once, then counted)."""
    import eval_pairwise as P
    _bigram_lm(tmp_path / "says_a", {"assistant": "a", "a": "<|im_end|>"})  # the chat template ends '<|im_start|>assistant\n'
    _bigram_lm(tmp_path / "says_red", {"assistant": "red", "red": "<|im_end|>"})
    args = _pairwise_inputs(tmp_path, ["a red circle.", "a blue square at the top.", "some shapes."],
                            ["some shapes.", "a blue square.", "a green triangle."])  # no scenes: any dataset
    results = P.main(args + [f"--judges=hf:{tmp_path / 'says_a'}, hf:{tmp_path / 'says_red'}", "--batch_size=2",
                             "--max_new_tokens=4"])
    a, red = results["judges"][f"hf:{tmp_path / 'says_a'}"], results["judges"][f"hf:{tmp_path / 'says_red'}"]
    assert (a["win"], a["tie"], a["loss"], a["unparseable"], a["calls"]) == (0, 3, 0, 0, 6)
    assert a["order_agreement"] == 0.0 and a["win_rate"] == 0.5 and a["retried_verdicts"] == 0
    assert (red["unparseable"], red["unparseable_verdicts"], red["retried_verdicts"], red["calls"]) == (3, {"ab": 3, "ba": 3}, 6, 12)
    assert red["win_rate"] is None and red["win_rate_ci95"] == [None, None]  # the unparseable judge has no rate
    assert results["mean_win_rate"] == 0.5
    assert results["per_image"][f"hf:{tmp_path / 'says_red'}"]["000.png"]["replies"] == ["red", "red"]
    assert "| 3 (3, 3) |" in (tmp_path / "out" / "results.md").read_text()


class _ChatServer:
    """A real chat-completions endpoint on a free local port, in a thread. Its judge prefers the
    description with more words (TIE when equal). Words in a prompt change its behaviour: 'slow' = the
    first request of a body sleeps past the client's timeout, 'fail' = the first one gets a 500,
    'babble' = a reply that is no verdict until the reminder comes, 'garbage' = a body that is no chat
    completion, always. With `budget`, requests beyond that many replies get 503s. Counts every request
    received and every reply sent, by body."""

    def __init__(self, key: str):
        import collections
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        server = self
        self.received, self.replied, self.budget = collections.Counter(), collections.Counter(), None

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def send(self, code, payload: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path != "/v1/chat/completions" or self.headers.get("Authorization") != f"Bearer {key}":
                    return self.send(401 if self.path == "/v1/chat/completions" else 404, b'{"error": "no"}')
                chat = json.dumps(body["messages"])
                server.received[chat] += 1
                prompt, reminded = body["messages"][0]["content"], len(body["messages"]) > 1
                if server.budget is not None and sum(server.replied.values()) >= server.budget:
                    return self.send(503, b'{"error": "overloaded"}')
                if "slow" in prompt and server.received[chat] == 1:
                    time.sleep(1.5)
                if "fail" in prompt and server.received[chat] == 1:
                    return self.send(500, b'{"error": "internal"}')
                server.replied[chat] += 1
                if "garbage" in prompt:
                    return self.send(200, b"<html>not a completion</html>")
                a, b = (len(re.search(rf"Description {x}: (.*)", prompt).group(1).split()) for x in "AB")
                content = "Both are lovely." if "babble" in prompt and not reminded else "A" if a > b else "B" if b > a else "TIE"
                self.send(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode())

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_pairwise_http_judge_verdicts_timeout_500_and_malformed_replies(tmp_path, monkeypatch):
    import eval_pairwise as P
    monkeypatch.setenv("PAIRWISE_TEST_KEY", "sk-test")
    server = _ChatServer("sk-test")
    try:
        candidate = ["a red circle and a blue square.", "a red circle.", "a red circle.", "a slow red circle here.",
                     "a fail red circle here.", "a babble red circle here.", "a garbage red circle."]
        baseline = ["a red circle.", "a blue square.", "a red circle and a green square.", "a red circle.",
                    "a red circle.", "a red circle.", "a red circle."]
        args = _pairwise_inputs(tmp_path, candidate, baseline)
        spec = f"openai:{server.url}|tiny-judge|PAIRWISE_TEST_KEY"
        run = args + [f"--judges={spec}", "--http_timeout=0.5", "--http_retries=2", "--http_backoff=0.01"]
        results = P.main(run)
        j = results["judges"][spec]
        # win: longer, slow, fail, babble (after the reminder); tie: equal; loss: shorter; garbage: unparseable
        assert (j["win"], j["tie"], j["loss"], j["unparseable"]) == (4, 1, 1, 1)
        assert j["unparseable_verdicts"] == {"ab": 1, "ba": 1} and j["retried_verdicts"] == 4 and j["order_agreement"] == 1.0
        assert j["win_rate"] == pytest.approx(4.5 / 6)
        # requests: 3 plain pairs x 2 orders; slow and fail twice per order; babble and garbage once, then reminded
        assert j["calls"] == 22 and sum(server.received.values()) == 22
        assert sorted(server.received.values()) == [1] * 14 + [2] * 4
        per = results["per_image"][spec]["006.png"]
        assert per["result"] == "unparseable" and per["replies"] == [None, None]
        cache = tmp_path / "out" / "http_cache.jsonl"
        assert len(cache.read_text().splitlines()) == 18  # every reply received once, the garbage ones as null
        again = P.main(run)  # everything from the cache: nothing is sent
        assert again["judges"][spec]["calls"] == 0 and sum(server.received.values()) == 22
        assert {k: v for k, v in again["judges"][spec].items() if k != "calls"} == {k: v for k, v in j.items() if k != "calls"}
        monkeypatch.setenv("PAIRWISE_TEST_KEY", "sk-wrong")
        with pytest.raises(P.JudgeError, match="HTTP 401"):  # not retried: a wrong key stays wrong
            P.main(run + [f"--out_dir={tmp_path / 'wrong_key'}"])
        assert sum(server.received.values()) == 22
    finally:
        server.close()


def test_pairwise_http_run_killed_midway_resumes_from_the_cache(tmp_path, monkeypatch):
    import eval_pairwise as P
    monkeypatch.setenv("PAIRWISE_TEST_KEY", "sk-test")
    server = _ChatServer("sk-test")
    try:
        args = _pairwise_inputs(tmp_path, ["a red circle and a blue square.", "a red circle.", "a green square.", "a cyan circle."],
                                ["a red circle.", "a blue square and a red triangle.", "a cyan square.", "some of the shapes."])
        spec = f"openai:{server.url}|tiny-judge|PAIRWISE_TEST_KEY"
        run = args + [f"--judges={spec}", "--http_timeout=2.0", "--http_retries=1", "--http_backoff=0.01"]
        server.budget = 3  # the server stops answering after 3 replies: the run stops
        with pytest.raises(P.JudgeError, match="failed 2 times, last: HTTP 503.*rerun the same command"):
            P.main(run)
        cache = tmp_path / "out" / "http_cache.jsonl"
        assert len(cache.read_text().splitlines()) == 3
        with open(cache, "a") as f:
            f.write('{"key": "a line cut by a kill')  # a kill mid-write leaves a torn last line
        server.budget = None
        results = P.main(run)
        j = results["judges"][spec]
        assert (j["win"], j["tie"], j["loss"], j["unparseable"]) == (1, 1, 2, 0)
        assert j["calls"] == 5  # the 8 verdicts minus the 3 paid for before the stop
        assert len(server.replied) == 8 and set(server.replied.values()) == {1}  # no body was paid for twice
        assert len(cache.read_text().splitlines()) == 8
    finally:
        server.close()

# ----------------------------------------------------------------------------- the memory plan (plan.py)

def _live_storages():
    """A dispatch mode that follows every storage an op creates (by weak reference) and records the most
    bytes alive at once after any op (`peak`): exact and deterministic on the CPU. `ignore` are storages
    that exist anyway (weights, inputs), also when an op returns a view of them."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode

    class LiveStorages(TorchDispatchMode):
        def __init__(self, ignore):
            super().__init__()
            self.ignore, self.alive, self.peak = {t.untyped_storage()._cdata for t in ignore}, {}, 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.alive = {k: v for k, v in self.alive.items() if not v[0].expired()}
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in self.ignore:
                    self.alive.setdefault(t.untyped_storage()._cdata, (StorageWeakRef(t.untyped_storage()), t.untyped_storage().nbytes()))
            self.peak = max(self.peak, sum(n for _, n in self.alive.values()))
            return out
    return LiveStorages


def _measured_activations(modules, inputs, step) -> int:
    """Peak bytes a training forward + backward creates beyond weights and inputs, flash attention (the
    plan's assumption), gradients of parameters dropped as they arrive (the plan counts them apart)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    params = [p for m in modules for p in m.parameters()]
    hooks = [p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None)) for p in params if p.requires_grad]
    tracker = _live_storages()(params + [b for m in modules for b in m.buffers()] + list(inputs))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION), tracker:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = step()
        loss.backward()
    for h in hooks:
        h.remove()
    return tracker.peak


# tiny models in the real configs' layouts: the plan's own dicts with smaller sizes
PLAN_TINY_DIT = dict(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=16,
                     num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=64, pooled_projection_dim=16,
                     pos_embed_max_size=16, qk_norm="rms_norm")
PLAN_TINY_QWEN = dict(
    text_config=dict(vocab_size=320, hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, hidden_act="silu",
                     bos_token_id=None, eos_token_id=None, pad_token_id=None,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
    vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64),
    tie_word_embeddings=True)


def _plan_tiny_models():
    import plan
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return plan.build_models(PLAN_TINY_QWEN, PLAN_TINY_DIT, _tiny_vae().config, clip=None, device="cpu")


@pytest.mark.parametrize("mode,checkpointing,steps", [("full", False, 1), ("full", True, 1), ("lora", False, 1),
                                                      ("full", False, 2), ("full", True, 2)])
def test_plan_dit_activations_match_measured_storages(mode, checkpointing, steps):
    """The plan's DiT activation model (per-op saved bytes; CPU rules: norms in bf16) against the storages a
    real training forward + backward of a 4-block SD3 MM-DiT keeps alive at its peak: pretrain_decoder's
    (projector + DiT trained, with and without activation checkpointing), grpo_decoder's (LoRA on the
    attention, base frozen, inputs without gradients) and cold_start's (2 Euler steps of the sampler
    backpropagated together, with and without checkpointing)."""
    import plan
    dit = _plan_tiny_models()["transformer"].to(torch.bfloat16)
    llm_hidden, projector_hidden, b, s_txt = 48, 96, 3, 12
    projector = M.projector_mlp(llm_hidden, projector_hidden, PLAN_TINY_DIT["joint_attention_dim"])  # fp32, as built
    torch.manual_seed(0)
    x, hidden = torch.randn(b, 4, 16, 16, dtype=torch.bfloat16), torch.randn(b, s_txt, llm_hidden, dtype=torch.bfloat16)
    pooled, t = torch.randn(b, 16, dtype=torch.bfloat16), torch.full((b,), 500.0)
    if mode == "lora":
        dit.requires_grad_(False)
        lora.inject_lora(dit, M.DIT_LORA_TARGETS, 4, 8)
        cond = projector(hidden.float()).to(torch.bfloat16).detach()
    if checkpointing:
        dit.enable_gradient_checkpointing()

    def step():
        c, z = (projector(hidden) if mode == "full" else cond), x
        for _ in range(steps):
            z = z - 0.5 * dit(hidden_states=z, encoder_hidden_states=c, pooled_projections=pooled, timestep=t).sample
        return z.float().pow(2).mean()
    measured = _measured_activations([dit, projector], [x, hidden, pooled, t], step)
    s_img = (16 // 2) ** 2
    predicted = plan.dit_activations(PLAN_TINY_DIT, b, s_img, s_txt, mode, checkpointing, lora_r=4,
                                     projector_hidden=projector_hidden if mode == "full" else 0, llm_hidden=llm_hidden,
                                     rules=plan.Rules(norm_fp32=False), steps=steps,
                                     held_grads=plan.BF16 * plan.count(dit) if mode == "full" else 0)
    if mode == "full":  # autocast's cached bf16 copy of the fp32 projector (plan_stage adds it too)
        predicted += plan.BF16 * plan.count(projector)
    print(f"{mode} checkpointing={checkpointing} steps={steps}: measured {measured} B, predicted {predicted:.0f} B")
    assert abs(predicted - measured) <= 0.2 * measured


def _tiny_llm_logprobs(checkpointing: bool):
    """A real 4-layer Qwen2.5-VL (the plan's tiny layout) in bf16 with fp32 LoRA on every text linear (A and B
    random, so both get gradients), in training mode with its layers checkpointed or not
    (captioner.checkpoint_llm_layers), and the teacher-forced (3, 16) log-probs of completion tokens after a
    left-padded prompt, as model.caption_logprobs computes them (logits_to_keep, no KV cache, token_logprobs)."""
    llm = _plan_tiny_models()["llm"].to(torch.bfloat16).requires_grad_(False).train()
    lora.inject_lora(llm.model.language_model, LLM_LORA_TARGETS, 4, 8)
    checkpoint_llm_layers(llm, checkpointing)
    b, tokens, new = 3, 48, 16
    torch.manual_seed(0)
    adapters = [p for m in lora.lora_layers(llm).values() for p in (m.lora_A, m.lora_B)]
    with torch.no_grad():
        for p in adapters:
            p.normal_(std=0.05)
    ids = torch.randint(2, 300, (b, tokens))  # not the banned ids: finite log-probs
    mask = torch.ones(b, tokens, dtype=torch.long)
    mask[0, :5] = 0  # a left-padded prompt, as caption_inputs pads
    scorer = type("Scorer", (), {"banned_token_ids": [0, 1]})()

    def logprobs():
        logits = llm(input_ids=ids, attention_mask=mask, logits_to_keep=new + 1, use_cache=False).logits
        return M.UAE.token_logprobs(scorer, logits[:, :-1], ids[:, -new:], 0.7)
    return llm, adapters, (ids, mask), logprobs, (b, tokens, new)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_plan_llm_lora_activations_match_measured_storages(checkpointing):
    """The plan's model of a LoRA forward + backward of the text model with the teacher-forced log-probs
    of grpo_encoder / cold_start against the measured peak of a real 4-layer Qwen2.5-VL text model, bf16
    weights, fp32 adapters, with and without its layers checkpointed (grad_checkpointing: layer inputs kept,
    one layer recomputed at a time)."""
    import plan
    llm, _, inputs, logprobs, (b, tokens, new) = _tiny_llm_logprobs(checkpointing)
    measured = _measured_activations([llm], inputs, lambda: -logprobs().mean())
    predicted = plan.llm_activations(PLAN_TINY_QWEN, b, tokens, 4, logits_tokens=new, checkpointing=checkpointing)
    print(f"checkpointing={checkpointing}: measured {measured} B, predicted {predicted:.0f} B")
    assert abs(predicted - measured) <= 0.2 * measured


def test_checkpointed_llm_layers_give_the_same_gradients_with_less_memory():
    """captioner.checkpoint_llm_layers (grad_checkpointing of cold_start and grpo_encoder) on a tiny Qwen2.5-VL
    with LoRA, one grpo_encoder update under bf16 autocast (the reference log-probs with the adapters off and
    no gradients, then the clipped surrogate with its KL): the same loss and bit-identical adapter gradients
    as keeping every activation (the recompute replays the forward exactly), each layer run again in the
    backward, and under half the measured activation memory. Switched off, nothing is recomputed."""
    results, measured = {}, {}
    for checkpointing in (False, True):
        llm, adapters, inputs, logprobs, (b, _, new) = _tiny_llm_logprobs(checkpointing)
        calls = []
        llm.model.language_model.layers[0].mlp.register_forward_pre_hook(lambda *_: calls.append(1))
        with torch.no_grad(), lora.lora_disabled(llm), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = logprobs()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logp = logprobs()
        loss = grpo_loss(logp, logp.detach(), ref, torch.tensor([1.0, -0.5, 0.8]), torch.ones(b, new), beta=0.04)
        loss.backward()
        assert len(calls) == 1 + (2 if checkpointing else 1)  # the reference, the forward (and the recompute)
        results[checkpointing] = (loss.detach(), [p.grad.clone() for p in adapters])
        measured[checkpointing] = _measured_activations([llm], inputs, lambda: -logprobs().mean())
    (loss, grads), (loss_ckpt, grads_ckpt) = results[False], results[True]
    assert torch.equal(loss, loss_ckpt) and all(g.abs().max() > 0 for g in grads)
    assert all(torch.equal(g, h) for g, h in zip(grads, grads_ckpt))
    print(f"activations: {measured[False]} B all kept, {measured[True]} B checkpointed")
    assert measured[True] < 0.5 * measured[False]
    checkpoint_llm_layers(llm, False)
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logprobs().mean().backward()
    assert len(calls) == 1


def _state_bytes(model, trained, opt, ema=()) -> dict:
    """Bytes held, summed over unique storages: every weight and buffer of the model, the trained
    parameters' gradients, the optimizer's state tensors and the EMA copies."""
    unique = lambda ts: sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in ts}.values())
    return {"weights": unique(list(model.parameters()) + list(model.buffers())),
            "grads": unique([p.grad for p in trained if p.grad is not None]),
            "optimizer": unique([v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]),
            "ema": unique(ema)}


def test_plan_weights_grads_optimizer_and_ema_match_a_real_step(paper_dirs):
    """The plan's bytes of weights, gradients, AdamW state and EMA (from counts and dtypes) against the
    tensors a real step holds, for pretrain_decoder (its build_model, new_ema: bf16 LLM / DiT / VAE, fp32
    projector, DDP) and grpo_encoder (LoRA on the text model, frozen bf16), both from their paper configs
    on the tiny Qwen2.5-VL / SD3.5 directories (one GPU, no reward backbone)."""
    import plan
    import pretrain_decoder
    dirs = [f"qwen_dir={paper_dirs[0]}", f"sd3_dir={paper_dirs[1]}", "image_size=16", "reward_backbone=", "device=cpu",
            "fsdp=False"]
    cfg = plan.stage_config("pretrain_decoder", dirs)
    model = pretrain_decoder.build_model(cfg, common.setup_runtime("cpu", "bfloat16"), (16, 16))
    models = {"llm": model.llm, "transformer": model.transformer, "vae": model.vae, "clip": None}
    with torch.no_grad():
        hidden = model.text_hidden_states(["a cat sits on a red mat.", "a dog."])
    trained = [p for m in model.decoder_modules() for p in m.parameters()]
    ema = pretrain_decoder.new_ema(trained)
    opt = torch.optim.AdamW(trained, lr=1e-4)
    x0, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pretrain_decoder.flow_matching_loss(model, x0, hidden, torch.tensor([0.3, 0.7]), noise, "velocity").backward()
    opt.step()
    cases = [(plan.plan_stage("pretrain_decoder", cfg, models, 1, False, rules=plan.Rules(False)),
              _state_bytes(model, trained, opt, ema))]
    cfg = plan.stage_config("grpo_encoder", dirs)
    predicted = plan.plan_stage("grpo_encoder", cfg, models, 1, False, rules=plan.Rules(False))  # before the adapters
    model.requires_grad_(False)
    adapters = model.add_lora("llm", cfg.lora_r, cfg.lora_alpha, LLM_LORA_TARGETS)
    opt = torch.optim.AdamW(adapters, lr=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.condition(["a cat sits on a red mat."]).float().pow(2).mean().backward()
    opt.step()
    cases.append((predicted, _state_bytes(model, adapters, opt)))
    for predicted, measured in cases:
        for key, value in measured.items():
            print(f"{predicted.name} {key}: measured {value} B, predicted {getattr(predicted, key):.0f} B")
            assert abs(getattr(predicted, key) - value) <= 0.2 * value + 1024  # AdamW's step counters: 4 B each


def test_decoder_diag_counts_errors_and_splits_the_outcome_variance(tiny_world):
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import decoder_diag
    import eval_unified
    O = shapes.Obj
    scene = (O("top left", "red", "circle", "large"), O("center", "blue", "square", "small"))
    drawn = (O("top left", "red", "circle", "small"), O("right", "blue", "square", "small"),
             O("bottom right", "green", "triangle", "large"))
    assert decoder_diag.errors(drawn, scene) == {"missing": 0, "extra": 1, "wrong_pos": 1, "wrong_size": 1}
    assert decoder_diag.errors(scene[:1], scene) == {"missing": 1, "extra": 0, "wrong_pos": 0, "wrong_size": 0}
    ckpt, data = str(tiny_world / "dec"), str(tiny_world / "val.jsonl")
    args = [f"--ckpts={ckpt}", f"--data={data}", "--n=6", "--steps=2", "--compile=False"]
    got = decoder_diag.main(args + ["--seeds=1"])[ckpt]
    # the same drawings as eval_unified's GenEval-shapes: same seed, sampler and rounding
    records = read_jsonl(data)[:6]
    model = M.UAE.load(ckpt).eval()
    cfg = eval_unified.configure(eval_unified.config, ["--sample_steps=2", "--batch_size=50"])
    rt = common.setup_runtime("cpu", "auto", 0)
    images = eval_unified.generate_from(model, rt, [r["caption"] for r in records], cfg, torch.Generator().manual_seed(0))
    assert got["exact"] == shapes.generation_report(images, shapes.scenes_of(records))["overall"]
    # the variance split by hand: caption 0 decided by the latent (right for one, wrong for the other), caption 1
    # by the SDE noise (one of two draws right under each latent); variances 1/4 and 1/4, within 0 and 1/4
    ok = np.array([[[1, 1], [1, 0]], [[0, 0], [0, 1]]], bool)  # (latents, draws, captions)
    assert decoder_diag.variance_split(ok) == (0.25, 0.125)
    run = decoder_diag.main(args + ["--mode=credit", "--seeds=2", "--latents=2"])[ckpt]
    assert 0.0 <= run["sde_variance"] <= run["variance"] and 0.0 <= run["exact"] <= 1.0
    with pytest.raises(ValueError, match="credit needs SDE noise"):
        decoder_diag.main(args + ["--mode=credit", "--noise_level=0.0"])
    with pytest.raises(ValueError, match="mode='x'"):
        decoder_diag.main(args + ["--mode=x"])
    with pytest.raises(ValueError, match="ckpts="):
        decoder_diag.main(args + [f"--ckpts={ckpt},{tiny_world}"])
# ----------------------------------------------------------------------------- bad input named before any work (issue 27)

def test_config_rules_name_each_bad_value_with_its_valid_range(tmp_path):
    from configurator import above, at_least, must, one_of, only_if, parses

    def spec(text):
        if ":" not in text:
            raise ValueError(f"'{text}' is not name:value")
    defaults = {"n": 1, "lr": 1e-3, "kind": "a", "spec": "x:1", "heads": 2, "hidden": 8, "path": "", "on": False}
    rules = {"n": at_least(1), "lr": at_least(0.0), "kind": one_of("a", "b"), "spec": parses(spec), "heads": above(0),
             "hidden": must(lambda v, c: v % c.heads == 0, "a multiple of heads"),
             "path": only_if(lambda c: c.kind == "b", must(lambda v, c: os.path.isdir(v), "a directory"))}
    assert configure(defaults, ["--lr=0"], rules).lr == 0.0  # odd but valid: runs
    assert configure(defaults, ["--path=/nope"], rules).path == "/nope"  # only checked where it is used
    for flags, error in [(["--n=0"], "config key n=0: must be at least 1"), (["--lr=-1"], "config key lr=-1.0: must be at least 0.0"),
                         (["--lr=1e999"], "config key lr=inf: must be at least 0.0"),
                         (["--kind=c"], "config key kind='c': must be one of 'a', 'b'"),
                         (["--spec=x"], "config key spec='x': 'x' is not name:value"),
                         (["--heads=3"], "config key hidden=8: must be a multiple of heads"),
                         (["--heads=0"], "config key heads=0: must be more than 0"),  # the hidden rule's division by 0: invalid too
                         (["--kind=b", "--path=/nope"], "config key path='/nope': must be a directory")]:
        with pytest.raises(ConfigError, match=re.escape(error)):
            configure(defaults, flags, rules)
    with pytest.raises(ConfigError, match=r"2 config values are invalid:\nconfig key n=0: .*\nconfig key kind='c'"):
        configure(defaults, ["--n=0", "--kind=c"], rules)
    (tmp_path / "latin1.py").write_bytes(b"n = 2  # caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.py' is not UTF-8 text \(byte 0xe9 at offset 12\)"):
        configure(defaults, [str(tmp_path / "latin1.py")], rules)


SCRIPTS = ("pretrain_encoder", "pretrain_decoder", "cold_start", "grpo_encoder", "grpo_decoder", "eval_unified", "eval_pairwise",
           "sample", "bench", "plan", "prepare", "train_vae", "pretrain_vq", "pretrain_umm2")
FREE_KEYS = {"sample": {"prompt"},  # any text (its words and length are checked against the checkpoint's tokenizer)
             "eval_pairwise": {"judges"}}  # parse_judges names a bad spec before any judging


def test_every_setting_of_every_script_has_a_rule():
    sys.path.insert(0, os.path.join(REPO, "data", "shapes"))
    for name in SCRIPTS:
        module = __import__(name)
        unruled = {k for k, v in module.config.items() if not isinstance(v, bool)} - set(module.rules) - FREE_KEYS.get(name, set())
        assert not unruled, f"{name}.py: no rule for {sorted(unruled)}"


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: bad settings must be named before."""
    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad setting was named")
    for owner, name in [(M.UAE, "load"), (M.UAE, "build_tiny"), (M.UAE, "from_pretrained"), (reward, "load_backbone"),
                        (umm2.UMM2, "load"), (umm2.UMM2, "build_tiny"), (umm2, "load_vq"), (umm2, "build_vq")]:
        monkeypatch.setattr(owner, name, loaded)


def test_bad_settings_of_every_script_are_named_before_any_model_loads(tiny_world, tmp_path, no_model_loads):
    sys.path.insert(0, os.path.join(REPO, "data", "shapes"))
    w, empty, a_file = tiny_world, tmp_path / "empty", tmp_path / "a_file"
    empty.mkdir(), a_file.write_text("x")
    (tmp_path / "vq_stage" / "vq").mkdir(parents=True), (tmp_path / "vq_stage" / "vq" / "config.json").write_text("{}")
    clip = f"--reward_backbone=open_clip:ShapesCLIP:{w / 'shapes_clip.pt'}"
    base = {"pretrain_encoder": [f"--data_dir={w}", f"--tokenizer_dir={w / 'tokenizer'}", f"--vae_dir={w / 'vae'}"],
            "pretrain_decoder": [f"--data_dir={w}", f"--init_from={w / 'enc'}", f"--vae_dir={w / 'vae'}"],
            "cold_start": [f"--data_dir={w}", f"--init_from={w / 'dec'}", clip],
            "grpo_encoder": [f"--data_dir={w}", f"--init_from={w / 'dec'}", clip],
            "grpo_decoder": [f"--data_dir={w}", f"--init_from={w / 'dec'}", clip],
            "eval_unified": [f"--ckpt={w / 'dec'}", f"--data={w / 'bench.jsonl'}", f"--clip=open_clip:ShapesCLIP:{w / 'shapes_clip.pt'}",
                             "--longclip=", "--dinov2=", "--reward_backbone="],
            "eval_pairwise": [f"--candidate={a_file}", f"--baseline={a_file}", f"--data={w / 'bench.jsonl'}"],
            "sample": [f"--ckpt={w / 'dec'}", f"--data={w / 'bench.jsonl'}"],
            "bench": [f"--init_from={w / 'dec'}", f"--data_dir={w}", f"--reward_backbone=open_clip:ShapesCLIP:{w / 'shapes_clip.pt'}"],
            "plan": [], "prepare": [], "train_vae": [f"--data_dir={w}"],
            "pretrain_vq": [f"--data_dir={w}"], "pretrain_umm2": [f"--data_dir={w}", f"--vq_dir={tmp_path / 'vq_stage'}"]}
    cases = [
        ("pretrain_encoder", ["--batch_size=0"], "batch_size=0: must be at least 1"),
        ("pretrain_encoder", ["--eval_n=0"], "eval_n=0: must be at least 1"),
        ("pretrain_encoder", ["--lr=-0.1"], "lr=-0.1: must be at least 0.0"),
        ("pretrain_encoder", ["--warmup=-1"], "warmup=-1: must be at least 0"),
        ("pretrain_encoder", ["--grad_clip=0"], "grad_clip=0.0: must be more than 0.0"),
        ("pretrain_encoder", ["--save_interval=0"], "save_interval=0: must be at least 1"),
        ("pretrain_encoder", ["--eval_interval=0"], "eval_interval=0: must be at least 1"),
        ("pretrain_encoder", ["--max_bad_steps=0"], "max_bad_steps=0: must be at least 1"),
        ("pretrain_encoder", ["--seed=-1"], "seed=-1: must be in [0, 2147483647]"),
        ("pretrain_encoder", ["--threads=-2"], "threads=-2: must be at least 0"),
        ("pretrain_encoder", ["--dtype=foo"], "dtype='foo': must be one of 'auto', 'float32', 'bfloat16', 'float16'"),
        ("pretrain_encoder", ["--device=tpu"], "device='tpu': must be auto, cpu, cuda or cuda:<index>"),
        ("pretrain_encoder", ["--grounding=1.5"], "grounding=1.5: must be in [0.0, 1.0]"),
        ("pretrain_encoder", ["--llm_hidden=48"], "llm_hidden=48: must be a multiple of 16 x llm_heads"),
        ("pretrain_encoder", ["--llm_heads=3"], "llm_heads=3: must be even and >= 2"),
        ("pretrain_encoder", ["--vision_hidden=100"], "vision_hidden=100: must be whole heads"),
        ("pretrain_encoder", ["--caption_field= "], "caption_field=' ': must be a JSONL field name"),
        ("pretrain_encoder", ["--init_from=/nonexistent"], "must be 'scratch' or a UAE checkpoint directory (a folder with model.json): no such directory"),
        ("pretrain_encoder", [f"--init_from={empty}"], "it has no model.json"),
        ("pretrain_encoder", [f"--tokenizer_dir={empty}"], "tokenizer_dir=" + repr(str(empty)) + ": the directory has no tokenizer.json"),
        ("pretrain_encoder", [f"--data_dir={empty}"], "the directory has no train.jsonl, val.jsonl"),
        ("pretrain_encoder", [f"--out_dir={a_file / 'sub'}"], f"cannot be created: {a_file} is a file"),
        ("pretrain_decoder", ["--captions=caption:0"], "captions='caption:0': 'caption:0' needs a field name (each once) and a positive weight"),
        ("pretrain_decoder", ["--captions=caption:x"], "'caption:x' is not field:weight"),
        ("pretrain_decoder", ["--captions=caption,caption"], "needs a field name (each once)"),
        ("pretrain_decoder", ["--qk_norm=foo"], "qk_norm='foo': must be one of '', 'rms_norm'"),
        ("pretrain_decoder", ["--prediction=eps"], "prediction='eps': must be one of 'velocity', 'sample'"),
        ("pretrain_decoder", ["--loss_space=x0"], "loss_space='x0': must be one of 'velocity', 'sample'"),
        ("pretrain_decoder", ["--cond_dropout=2"], "cond_dropout=2.0: must be in [0.0, 1.0]"),
        ("pretrain_decoder", ["--ema_decay=1"], "ema_decay=1.0: must be in [0, 1)"),
        ("pretrain_decoder", ["--dit_patch=0"], "dit_patch=0: must be at least 1"),
        ("pretrain_decoder", ["--max_text_tokens=0"], "max_text_tokens=0: must be at least 1"),
        ("pretrain_decoder", ["--image_size=-1"], "image_size=-1: must be at least 0"),
        ("pretrain_decoder", ["--fsdp=True"], "fsdp=True: must be False outside a torchrun launch"),
        ("pretrain_decoder", ["--init_from=pretrained", "--qwen_dir=/nope"], "qwen_dir='/nope': no such directory"),
        ("pretrain_decoder", [f"--out_dir={w / 'enc'}"], "is init_from: a save would replace the checkpoint the run starts from"),
        ("cold_start", ["--temperature=0"], "temperature=0.0: must be more than 0.0"),
        ("cold_start", ["--lora_r=0"], "lora_r=0: must be at least 1"),
        ("cold_start", ["--lora_alpha=0"], "lora_alpha=0: must be more than 0.0"),
        ("cold_start", ["--micro_batch=-1"], "micro_batch=-1: must be at least 0"),
        ("cold_start", ["--ce_weight=-1"], "ce_weight=-1.0: must be at least 0.0"),
        ("cold_start", ["--sample_steps=0"], "sample_steps=0: must be at least 1"),
        ("cold_start", ["--reward_backbone=open_clip:ShapesCLIP"], "invalid backbone spec 'open_clip:ShapesCLIP'; valid forms"),
        ("cold_start", ["--reward_backbone=open_clip:ShapesCLIP:/nope.pt"], "open_clip checkpoint not found: '/nope.pt'"),
        ("cold_start", [f"--data_dir={empty}"], "the directory has no train.jsonl"),
        ("grpo_encoder", ["--group_size=1"], "group_size=1: must be at least 2 (GRPO's advantages compare the samples of a group"),
        ("grpo_encoder", ["--group_size=0"], "group_size=0: must be at least 2"),
        ("grpo_encoder", ["--images_per_step=0"], "images_per_step=0: must be at least 1"),
        ("grpo_encoder", ["--clip_eps=0"], "clip_eps=0.0: must be in (0, 1)"),
        ("grpo_encoder", ["--mu=0"], "mu=0: must be at least 1"),
        ("grpo_encoder", ["--aggregation=mean"], "aggregation='mean': must be one of 'token', 'sequence'"),
        ("grpo_encoder", ["--weights_dtype=int8"], "weights_dtype='int8': must be one of 'float32', 'bfloat16', 'float16'"),
        ("grpo_encoder", ["--beta=-1"], "beta=-1.0: must be at least 0.0"),
        ("grpo_encoder", ["--probe_n=0"], "probe_n=0: must be at least 1"),
        ("grpo_encoder", ["--max_new_tokens=-1"], "max_new_tokens=-1: must be at least 0"),
        ("grpo_decoder", ["--group_size=1"], "group_size=1: must be at least 2"),
        ("grpo_decoder", ["--train_steps=1"], "train_steps=1: must be at least 2"),
        ("grpo_decoder", ["--noise_level=0"], "noise_level=0.0: must be more than 0.0"),
        ("grpo_decoder", ["--timestep_fraction=0"], "timestep_fraction=0.0: must be in (0, 1]"),
        ("grpo_decoder", ["--advantage_std=global"], "advantage_std='global': must be one of 'group', 'batch'"),
        ("grpo_decoder", ["--captions_per_step=0"], "captions_per_step=0: must be at least 1"),
        ("grpo_decoder", ["--cfg_scale=-1"], "cfg_scale=-1.0: must be at least 0.0"),
        ("eval_unified", ["--batch_size=0"], "batch_size=0: must be at least 1"),
        ("eval_unified", ["--ckpt=/nope"], "ckpt='/nope': must be a UAE or UMM2 checkpoint directory"),
        ("grpo_decoder", ["--init_from=/nope"], "init_from='/nope': must be a UAE or UMM2 checkpoint directory"),
        ("grpo_encoder", ["--init_from=/nope"], "init_from='/nope': must be a UAE or UMM2 checkpoint directory"),
        ("eval_unified", ["--data=/nope.jsonl"], "data='/nope.jsonl': must be a JSONL file or a folder of images"),
        ("eval_unified", ["--dinov2=hf:/nope"], "model directory not found: '/nope'"),
        ("eval_unified", ["--generated=/nope", f"--references={empty}"], "generated='/nope': no such directory"),
        ("sample", ["--mode=x2y"], "mode='x2y': must be one of 'i2t', 't2i', 'i2i'"),
        ("sample", ["--n=0"], "n=0: must be at least 1"),
        ("sample", ["--ckpt=/nope"], "ckpt='/nope': must be a UAE checkpoint directory"),
        ("bench", ["--steps=1"], "steps=1: must be at least 2 (the first timed step is warm-up"),
        ("bench", ["--kinds=foo"], "kinds='foo': must be a comma-separated subset of encoder, decoder"),
        ("bench", ["--kinds=encoder,encoder"], "(each once)"),
        ("bench", ["--encoder_args=--nope=1"], "unknown config key 'nope'"),
        ("bench", ["--decoder_args=--group_size=x"], "'group_size' expects int"),
        ("eval_pairwise", ["--dtype=auto"], "dtype='auto': must be one of 'float32', 'bfloat16', 'float16'"),
        ("eval_pairwise", ["--http_timeout=0"], "http_timeout=0.0: must be more than 0.0"),
        ("eval_pairwise", ["--candidate=/nope.jsonl"], "candidate='/nope.jsonl': must be a captions.jsonl file"),
        ("plan", ["--mfu=0"], "mfu=0.0: must be in (0, 1]"),
        ("plan", ["--stages=foo"], "stages='foo': must be a comma-separated subset of"),
        ("prepare", ["--clip_batch=1"], "clip_batch=1: must be at least 2"),
        ("pretrain_vq", ["--channels=48"], "channels=48: must be a positive multiple of 32 (GroupNorm of 32 groups)"),
        ("pretrain_vq", ["--object_weight=0"], "object_weight=0.0: must be more than 0.0"),
        ("pretrain_vq", ["--restart_interval=-1"], "restart_interval=-1: must be at least 0 (0 = never)"),
        ("pretrain_vq", ["--levels=0"], "levels=0: must be at least 1"),
        ("pretrain_umm2", ["--t2i_share=0"], "t2i_share=0.0: must be in (0, 1), leaving each task at least one row"),
        ("pretrain_umm2", ["--t2i_share=1"], "t2i_share=1.0: must be in (0, 1)"),
        ("pretrain_umm2", ["--llm_heads=3"], "llm_heads=3: must be a positive multiple of llm_kv_heads"),
        ("pretrain_umm2", ["--llm_hidden=100"], "llm_hidden=100: must be a multiple of 2 x llm_heads"),
        ("pretrain_umm2", ["--max_new_tokens=0"], "max_new_tokens=0: must be at least 1"),
        ("pretrain_umm2", ["--captions=caption:0"], "'caption:0' needs a field name (each once) and a positive weight"),
        ("pretrain_umm2", [f"--vq_dir={empty}"], "vq_dir=" + repr(str(empty)) + ": the directory has no vq/config.json"),
        ("pretrain_umm2", ["--init_from=/nonexistent"], "must be 'scratch' or a UMM2 checkpoint directory (a folder with model.json)"),
        ("train_vae", ["--norm_num_groups=3"], "block_out_channels=(16, 32, 64): must be a tuple of positive channel counts, each divisible by norm_num_groups"),
    ]
    if not torch.cuda.is_available():
        cases.append(("grpo_encoder", ["--device=cuda"], "device='cuda': names a CUDA device, but torch sees no GPU here"))
    for script, flags, error in cases:
        module = __import__(script)
        out = [f"--out_dir={tmp_path / 'out'}"] if "out_dir" in module.config else []
        with pytest.raises(ConfigError, match=re.escape(error)):
            module.main(base[script] + out + flags)
    with pytest.raises(ConfigError, match=r"2 config values are invalid:\n.*group_size=1.*\n.*mu=0"):
        __import__("grpo_encoder").main(base["grpo_encoder"] + ["--group_size=1", "--mu=0"])


def test_lr_zero_runs_and_moves_nothing(tiny_world, tmp_path):
    """An odd but valid value runs: with lr=0 every step leaves the weights where they were."""
    import pretrain_encoder
    args = [f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
            "--lr=0", "--eval_interval=100", "--log_interval=1"] + TINY_ENCODER
    for steps in (1, 3):
        pretrain_encoder.main(args + [f"--out_dir={tmp_path / str(steps)}", f"--max_steps={steps}"])
    one, three = (M.UAE.load(str(tmp_path / d)).llm.state_dict() for d in ("1", "3"))
    assert common.load_training_state(str(tmp_path / "3"))["step"] == 3
    assert [k for k in one if not torch.equal(one[k], three[k])] == []


def _records(root, rows: list[dict], name="data.jsonl"):
    path = root / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_not_utf8_and_missing_images_are_named(tmp_path):
    lines = _write_dataset(tmp_path)
    (tmp_path / "latin1.jsonl").write_bytes((lines[0] + "\n").encode() + b'{"image": "images/1.png", "caption": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"latin1.jsonl:2: not UTF-8 \(byte 0xe9 at column 42\)"):
        read_jsonl(str(tmp_path / "latin1.jsonl"))
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + (lines[0] + "\n").encode())  # a byte-order mark is fine
    assert read_jsonl(str(tmp_path / "bom.jsonl"))[0]["image"] == "images/0.png"
    (tmp_path / "images" / "2.png").unlink()
    assert len(read_jsonl(str(tmp_path / "train.jsonl"))) == 3  # a stage that reads every image first names it then
    with pytest.raises(DataError, match=r"train.jsonl:3: cannot read image .*2.png \(no such file\)"):
        read_jsonl(str(tmp_path / "train.jsonl"), need_images=True)  # one that reads them per step: now, not midway


@pytest.mark.parametrize("change,error", [
    ({"color": "pink"}, "scene object 0: color 'pink' is not one of red, green, blue, yellow, purple, cyan"),
    ({"shape": "star"}, "scene object 0: shape 'star' is not one of circle, square, triangle"),
    ({"size": "huge"}, "scene object 0: size 'huge' is not one of large, small"),
    ({"pos": "middle"}, "scene object 0: pos 'middle' is not one of top left, top, top right, left, center"),
    ({"pos": None}, "scene object 0: pos None is not one of"),
    ({"dx": 5}, "scene object 0: dx 5 must be an integer in [-1, 1]"),
    ({"colour": "red"}, "scene object 0 has unknown field(s) colour; valid: pos, color, shape, size, dx, dy"),
    ({"pos": "top right"}, "two scene objects share the cell top right"),
    ({"color": "blue", "shape": "square"}, "two scene objects share the colour and shape ('blue', 'square')"),
])
def test_scene_fields_are_checked_with_file_and_line(change, error, tmp_path):
    good = [{"pos": "top left", "color": "red", "shape": "circle", "size": "large", "dx": 0, "dy": 1},
            {"pos": "top right", "color": "blue", "shape": "square", "size": "small"}]
    bad = [dict(good[0], **change), good[1]]
    path = _records(tmp_path, [{"image": "a.png", "scene": good}, {"image": "b.png", "scene": bad}])
    records = read_jsonl(str(path), need_caption=False)
    with pytest.raises(DataError, match=re.escape(f"{path}:2: {error}")):
        shapes.scenes_of(records)


def test_scene_shapes_and_mixed_lines_are_named(tmp_path):
    path = _records(tmp_path, [{"image": "a.png", "scene": []}, {"image": "b.png", "scene": {"pos": "top"}},
                               {"image": "c.png", "scene": ["red circle"]}, {"image": "d.png"}])
    records = read_jsonl(str(path), need_caption=False)
    assert shapes.scenes_of(records[:1]) == [()]
    with pytest.raises(DataError, match=re.escape(f'{path}:2: "scene" must be a list of objects, got an object')):
        shapes.scenes_of(records[1:2])
    with pytest.raises(DataError, match=re.escape(f"{path}:3: scene object 0 must be an object")):
        shapes.scenes_of(records[2:3])
    with pytest.raises(DataError, match=re.escape(f'{path}:4: no "scene", while {path}:1 has one')):
        shapes.scenes_of([records[0], records[3]])
    assert shapes.scenes_of(records[3:]) is None  # no scenes at all: another dataset, no oracle tables
    with pytest.raises(ValueError, match="detect_scene reads 48x48 RGB images of the shapes world, got 64x64"):
        shapes.detect_scene(np.zeros((64, 64, 3), np.uint8))


def test_bad_data_is_named_before_any_model_loads(tiny_world, tmp_path, no_model_loads):
    """A bad scene in a shapes JSONL stops every script that reads it before any model is loaded (it used to fail
    after all of eval_unified's reconstructions); so do images the oracle cannot read."""
    import eval_unified
    import grpo_encoder
    import pretrain_encoder
    rows = [dict(r, image=r["image_path"]) for r in read_jsonl(str(tiny_world / "val.jsonl"))]
    rows[1]["scene"][0]["pos"] = "middle"
    bad = tmp_path / "bad"
    bad.mkdir()
    _records(bad, rows, "train.jsonl"), _records(bad, rows, "val.jsonl")
    error = re.escape("val.jsonl:2: scene object 0: pos 'middle' is not one of")
    with pytest.raises(DataError, match=error.replace("val", "train")):
        pretrain_encoder.main([f"--data_dir={bad}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
                               f"--out_dir={tmp_path / 'o1'}"])
    with pytest.raises(DataError, match=error):
        grpo_encoder.main([f"--data_dir={bad}", f"--init_from={tiny_world / 'dec'}", f"--out_dir={tmp_path / 'o2'}",
                           f"--reward_backbone=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}"])
    judge = [f"--clip=open_clip:ShapesCLIP:{tiny_world / 'shapes_clip.pt'}", "--longclip=", "--dinov2=", "--reward_backbone="]
    with pytest.raises(DataError, match=error):
        eval_unified.main([f"--ckpt={tiny_world / 'dec'}", f"--data={bad / 'val.jsonl'}", f"--out_dir={tmp_path / 'o3'}"] + judge)
    from PIL import Image
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "big.png")
    big = _records(tmp_path, [dict(rows[0], image=str(tmp_path / "big.png"))], "big.jsonl")
    with pytest.raises(DataError, match=r"big.jsonl:1: image .*big.png is not 48x48, the shapes world's canvas"):
        eval_unified.main([f"--ckpt={tiny_world / 'dec'}", f"--data={big}", f"--out_dir={tmp_path / 'o4'}"] + judge)


def test_words_outside_the_vocabulary_are_errors_in_data_and_counted_in_model_output(tiny_uae, tiny_world, tmp_path):
    model = tiny_uae
    assert model.unknown_words(["a big red circle.", "a red circle at the top."]) == [["big"], []]
    assert shapes.unknown_words("A big red circle... at the top-left") == ["big", "...", "-"]
    rows = [{"image": "a.png", "caption": "a red circle."}, {"image": "b.png", "caption": "a big red circle."},
            {"image": "c.png", "caption": "some shapes " * 20}]
    path = _records(tmp_path, rows)
    records = read_jsonl(str(path))
    with pytest.raises(DataError, match=re.escape(f"{path}:2: \"caption\" has words the tokenizer does not know: 'big'; "
                                                  f"the model would read them as [UNK]. Known words: ") + ".*circle"):
        model.check_texts(records, "caption")
    with pytest.raises(DataError, match=re.escape(f"{path}:3: \"caption\" takes 43 tokens, more than the decoder's window "
                                                  f"of max_text_tokens=24 (1 such line(s) in all)")):
        model.check_texts(records[:1] + records[2:], "caption")
    assert model.check_texts(records[:1] + records[2:], "caption", window=False)[0] == "a red circle."
    with pytest.raises(ValueError, match=r"1 of 2 captions have words the tokenizer does not know \(e.g. 'big'"):
        model.condition(["a red circle.", "a big red circle."])  # a prompt given to the decoder: never a silent [UNK]
    before = model.unknown_word_captions
    with torch.no_grad():
        model.condition(["a big red circle."], allow_cut=True)  # the model's own caption: counted, reported by eval_unified
    assert model.unknown_word_captions - before == 1
    # training data: pretrain_decoder names the line before any step
    import pretrain_decoder
    lines = [json.loads(l) for l in (tiny_world / "train.jsonl").read_text().splitlines()]
    lines[3]["partial_caption"] = "a huge red circle."
    data = tmp_path / "world"
    data.mkdir()
    _records(data, [dict(r, image=str(tiny_world / r["image"])) for r in lines], "train.jsonl")
    (data / "val.jsonl").write_text("".join(json.dumps(dict(r, image=str(tiny_world / r["image"]))) + "\n"
                                            for r in map(json.loads, (tiny_world / "val.jsonl").read_text().splitlines())))
    with pytest.raises(DataError, match=r"world/train.jsonl:4: \"partial_caption\" has words the tokenizer does not know: 'huge'"):
        pretrain_decoder.main([f"--data_dir={data}", f"--init_from={tiny_world / 'enc'}", f"--out_dir={tmp_path / 'dec'}",
                               f"--vae_dir={tiny_world / 'vae'}"] + TINY_DECODER)
    assert not (tmp_path / "dec").exists()
    # model output judged by the exact judge: counted and reported
    import eval_pairwise as P
    scene = (shapes.Obj("top", "red", "circle", "large"),)
    results = P.main(_pairwise_inputs(tmp_path, ["a big red circle.", "a red circle."], ["some shapes.", "a red circle."], [scene] * 2))
    assert results["unknown_words"]["candidate"] == {"captions": 1, "per_image": {"000.png": ["big"]}}
    assert results["unknown_words"]["baseline"]["captions"] == 0


def test_checks_that_need_the_model_come_before_any_step(tiny_world, tmp_path):
    """What depends on the loaded model (the caption cap, the DiT's image size and patch) is named right after
    loading, before any training step."""
    import pretrain_decoder
    import pretrain_encoder
    with pytest.raises(ValueError, match=r"max_new_tokens=999 exceeds the \d+ caption tokens the decoder reads"):
        pretrain_encoder.main([f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
                               f"--out_dir={tmp_path / 'enc'}", "--max_new_tokens=999"] + TINY_ENCODER[:-2])
    args = [f"--data_dir={tiny_world}", f"--init_from={tiny_world / 'enc'}", f"--vae_dir={tiny_world / 'vae'}"] + TINY_DECODER
    with pytest.raises(ValueError, match=r"40x40 images: the decoder trains on sides that are multiples of 16 px .* up to 48 px"):
        pretrain_decoder.main(args + [f"--out_dir={tmp_path / 'd1'}", "--image_size=40"])
    with pytest.raises(ValueError, match=r"64x64 images: .* up to 48 px"):
        pretrain_decoder.main(args + [f"--out_dir={tmp_path / 'd2'}", "--image_size=64"])
    with pytest.raises(ValueError, match=r"dit_patch=5 must divide the VAE's 12x12 latent grid"):
        pretrain_decoder.main(args + [f"--out_dir={tmp_path / 'd3'}", "--dit_patch=5"])
    assert not any((tmp_path / d).exists() for d in ("enc", "d1", "d2", "d3"))


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return data


def test_damaged_checkpoints_name_the_file_and_what_to_do(tiny_world, tmp_path):
    import shutil
    import pretrain_encoder
    for stage in ("enc", "dec"):  # a folder of stages moves as a whole: dec references enc's LLM
        shutil.copytree(tiny_world / stage, tmp_path / stage)
    dec, enc = tmp_path / "dec", tmp_path / "enc"
    rerun = "the checkpoint is damaged; re-run the stage that wrote it"
    for path in (dec / "projector.safetensors", dec / "transformer" / "diffusion_pytorch_model.safetensors",
                 enc / "llm" / "model.safetensors", dec / "vae" / "config.json"):
        good = _cut(path)
        with pytest.raises(common.CheckpointError, match=re.escape(f"{path} cannot be read (") + ".*" + re.escape(rerun)):
            M.UAE.load(str(dec))
        path.write_bytes(good)
    meta = json.loads((dec / "model.json").read_text())
    (dec / "model.json").write_text(json.dumps(meta)[:40])
    with pytest.raises(common.CheckpointError, match=re.escape(f"{dec / 'model.json'} cannot be read (JSONDecodeError")):
        M.UAE.load(str(dec))
    (dec / "model.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "max_text_tokens"}))
    with pytest.raises(common.CheckpointError, match=re.escape(f"{dec / 'model.json'} has no 'max_text_tokens'")):
        M.UAE.load(str(dec))
    (dec / "model.json").write_text(json.dumps(meta))
    # a LoRA stage's adapter: named when the checkpoint loads, and when a run resumes from it
    model = M.UAE.load(str(dec))
    model.add_lora("llm", 4, 8, LLM_LORA_TARGETS)
    model.save(str(tmp_path / "lora_stage"), ("llm",))
    for name in ("lora.safetensors", "adapter_config.json"):
        path = tmp_path / "lora_stage" / "lora_llm" / name
        good = _cut(path)
        with pytest.raises(common.CheckpointError, match=re.escape(f"{path} cannot be read (") + ".*" + re.escape(rerun)):
            M.UAE.load(str(tmp_path / "lora_stage"))
        with pytest.raises(common.CheckpointError, match=re.escape(f"{path} cannot be read (") + ".*--resume=False or another out_dir"):
            lora.load_lora(model.llm, str(tmp_path / "lora_stage" / "lora_llm"))
        path.write_bytes(good)
    # resuming a run whose own checkpoint is damaged: start afresh
    _cut(enc / "llm" / "model.safetensors")
    with pytest.raises(common.CheckpointError, match=re.escape(f"{enc / 'llm' / 'model.safetensors'} cannot be read (") +
                       r".*start afresh with --resume=False or another out_dir"):
        pretrain_encoder.main([f"--data_dir={tiny_world}", f"--tokenizer_dir={tiny_world / 'tokenizer'}", f"--vae_dir={tiny_world / 'vae'}",
                               f"--out_dir={enc}", "--max_steps=7", "--log_interval=3", "--eval_interval=6", "--save_interval=6"] + TINY_ENCODER)


def test_damaged_umm2_checkpoints_name_the_file_and_what_to_do(tiny_umm2, tiny_vq, tmp_path):
    """UMM2.load and load_vq name a cut or unparsable file with the remedy, as UAE.load does."""
    import shutil
    tiny_umm2.save(str(tmp_path / "m"))
    shutil.copytree(tiny_vq, tmp_path / "v")
    rerun = "the checkpoint is damaged; re-run the stage that wrote it"
    for path, load in ((tmp_path / "m" / "llm" / "model.safetensors", lambda: umm2.UMM2.load(str(tmp_path / "m"))),
                       (tmp_path / "m" / "processor" / "tokenizer_config.json", lambda: umm2.UMM2.load(str(tmp_path / "m"))),
                       (tmp_path / "v" / "vq" / "model.safetensors", lambda: umm2.load_vq(str(tmp_path / "v")))):
        good = _cut(path)
        with pytest.raises(common.CheckpointError, match=re.escape(f"{path} cannot be read (") + ".*" + re.escape(rerun)):
            load()
        path.write_bytes(good)
    (tmp_path / "m" / "model.json").write_text(json.dumps({"architecture": "UMM2", "parts": {}}))
    with pytest.raises(common.CheckpointError, match="has no 'caption_prompt'"):
        umm2.UMM2.load(str(tmp_path / "m"))
    _cut(tmp_path / "v" / "vq" / "model.safetensors")
    with pytest.raises(common.CheckpointError, match=r"--resume=False or another out_dir"):
        umm2.load_vq(str(tmp_path / "v"), remedy=common.RESUME_REMEDY)


def test_kill_resume_script_one_kill(tiny_world, tmp_path):
    """tools/kill_resume.py, the issue-27 check, on one stage with one SIGKILL: the killed run's state loads and
    the rerun ends bit-identical to the uninterrupted run (the full 5 stages x 10 kills: its docstring)."""
    sys.path.insert(0, os.path.join(REPO, "tools"))
    import kill_resume
    rows = kill_resume.main(["--stages=pretrain_encoder", "--kills=1", "--max_steps=4", f"--world={tiny_world}",
                             f"--work_dir={tmp_path / 'kr'}"])
    assert len(rows) == 1 and rows[0]["kills"] + rows[0]["after the end"] == 1
    assert rows[0]["loadable"] == rows[0]["kills"] and rows[0]["identical"] == 1
