"""Tests for reward.py: backbones built tiny and locally, the reconstruction reward, GRPO advantages.

    python -m pytest -q test_reward_part.py
"""
import math
import os
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may come from a hub, ever
REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import reward  # noqa: E402
from reward import ReconstructionReward, cosine, group_advantages, load_backbone  # noqa: E402


# ----------------------------------------------------------------------------- cosine, advantages

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
    for size in ((64, 64), (50, 90), (150, 90)):  # native, upsampled, downsampled + cropped
        images = torch.rand(3, 3, *size)
        feats = backbone(images)
        assert feats.shape == (3, 128) and feats.dtype == torch.float32
        torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
        # open_clip's own torchvision transform + encode_image on the same tensor
        torch.testing.assert_close(feats, reference_clip(shapes_clip, images), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(backbone.features(images, batch_size=2), feats)
    assert not backbone.features(images).requires_grad


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
        traced = torch.jit.trace(holder, torch.rand(1, 3, 64, 64), check_trace=False)
    torch.jit.save(traced, tmp_path / "openai.pt")
    backbone = load_backbone(f"open_clip:ShapesCLIP:{tmp_path / 'openai.pt'}", device="cpu")
    torch.testing.assert_close(backbone(images), expected, atol=1e-5, rtol=1e-5)
    # a checkpoint whose image tower does not fit the named architecture is an error, not random init
    torch.save({k: v for k, v in state.items() if k != "visual.proj"}, tmp_path / "broken.pt")
    with pytest.raises(RuntimeError, match="proj"):
        load_backbone(f"open_clip:ShapesCLIP:{tmp_path / 'broken.pt'}", device="cpu")


# ----------------------------------------------------------------------------- DINOv2 / DINOv3

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


@pytest.mark.parametrize("family", ["dinov2", "dinov3"])
def test_hf_backbone_matches_pooler_output(family, tmp_path):
    save = {"dinov2": save_dinov2, "dinov3": save_dinov3}[family]
    model, processor = save(tmp_path)
    backbone = load_backbone(f"hf:{tmp_path}", device="cpu")
    assert not any(p.requires_grad for p in backbone.parameters())
    torch.manual_seed(1)
    images = torch.rand(3, 3, 70, 50, requires_grad=True)
    if family == "dinov2":  # shortest side 40 (bicubic), center crop 32
        pixels = manual_preprocess(images.detach(), 40, (32, 32), "bicubic", processor.image_mean, processor.image_std)
    else:  # DINOv3 resizes straight to 32x32 (bilinear), no crop
        pixels = manual_preprocess(images.detach(), (32, 32), None, "bilinear", processor.image_mean, processor.image_std)
    # ... which is also what the transformers processor itself produces (it expects [0, 255])
    torch.testing.assert_close(processor(images=list(images.detach() * 255), return_tensors="pt").pixel_values,
                               pixels, atol=1e-5, rtol=1e-5)
    feats = backbone(images)
    with torch.no_grad():
        expected = F.normalize(model(pixel_values=pixels).pooler_output, dim=-1)
    assert feats.shape == (3, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(feats, expected, atol=1e-5, rtol=1e-5)
    feats.sum().backward()
    assert images.grad.abs().sum() > 0


def test_hf_rejects_non_dino_models(tmp_path):
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
