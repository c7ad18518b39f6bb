"""Frozen image-feature backbones (open_clip / transformers CLIP, DINOv2, DINOv3), the reconstruction
reward r = cos(f(x), f(x_hat)), and GRPO group-normalised advantages."""
import logging
import os
import zipfile
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

SPEC_FORMS = "'open_clip:<model_name>:<checkpoint_file>' or 'hf:<local_dir>'"
HF_TYPES = ("clip", "dinov2", "dinov2_with_registers", "dinov3_vit")  # the model types an hf: spec may hold


class Backbone(nn.Module):
    """A frozen image encoder with its own preprocessing written in torch, so that features are
    differentiable w.r.t. the input pixels (`forward`, the RL reward). `resize` is an int (shortest
    side, aspect kept) or an exact (H, W); `crop` is a center crop (H, W) or None. `processor`: an hf
    model's own image processor, which the scoring path (`features`, the bench) uses instead."""

    def __init__(self, name: str, encoder: nn.Module, resize: int | tuple[int, int],
                 crop: tuple[int, int] | None, interpolation: str,
                 mean: Sequence[float], std: Sequence[float], processor=None):
        super().__init__()
        self.name, self.encoder, self.processor = name, encoder, processor
        self.resize, self.crop, self.interpolation = resize, crop, interpolation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Backbone":
        # a frozen scorer must stay deterministic (no patch dropout / drop path) even when a parent
        # module is switched to training mode
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        x = images.to(self.device, torch.float32)
        h, w = x.shape[-2:]
        size = self.resize
        if isinstance(size, int):  # same rounding as torchvision Resize(int): long side truncated
            long = int(size * max(h, w) / min(h, w))
            size = (size, long) if h <= w else (long, size)
        if (h, w) != tuple(size):
            x = F.interpolate(x, size=size, mode=self.interpolation, antialias=True, align_corners=False)
        if self.crop is not None:  # same offsets as torchvision center_crop
            top, left = round((size[0] - self.crop[0]) / 2), round((size[1] - self.crop[1]) / 2)
            x = x[..., top:top + self.crop[0], left:left + self.crop[1]]
        return (x - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: (B, 3, H, W) floats in [0, 1], any size/device -> (B, D) unit-norm fp32 features."""
        return self.embed(self.preprocess(images))

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Preprocessed pixels -> unit-norm fp32 features."""
        return F.normalize(self.encoder(pixels.to(self.device, next(self.encoder.parameters()).dtype)).float(), dim=-1)

    @torch.no_grad()
    def features(self, images: Sequence[np.ndarray], batch_size: int = 64) -> torch.Tensor:
        """The scoring path: (H, W, 3) uint8 RGB images of any sizes -> (N, D) unit-norm fp32 features.
        An hf model sees what the released Unified-Bench scorer feeds it: PIL images through its own
        image processor. An open_clip model goes through `forward` (a chunk of equal sizes at once)."""
        out = []
        for i in range(0, len(images), batch_size):
            chunk = images[i:i + batch_size]
            if self.processor is not None:
                pil = [Image.fromarray(im) for im in chunk]
                out.append(self.embed(self.processor(images=pil, return_tensors="pt").pixel_values))
            else:
                x = [torch.tensor(im).permute(2, 0, 1) / 255 for im in chunk]
                out += [self(torch.stack(x))] if len({t.shape for t in x}) == 1 else [self(t[None]) for t in x]
        return torch.cat(out)


class HFImageTower(nn.Module):
    """pixel_values -> the image feature the released scorer takes: CLIP's get_image_features (the
    projected pooled token), a DINO model's CLS token of last_hidden_state (after the final norm)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.clip = model, model.config.model_type == "clip"

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.clip:
            out = self.model.get_image_features(pixel_values=pixel_values)
            return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns a ModelOutput
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]


def _is_torchscript(path: str) -> bool:  # the marker torch.load itself checks for
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("/constants.pkl") for n in z.namelist())


def _load_open_clip(spec: str, name: str, path: str) -> Backbone:
    import open_clip
    from open_clip.factory import load_state_dict
    open_clip.add_model_config(Path(__file__).parent / "config" / "open_clip")  # ShapesCLIP etc.
    # We build the architecture by name and load the weights ourselves, so silence create_model's
    # "initialized randomly" warning. pretrained_text=False: never fetch a hub text tower.
    logging.disable(logging.WARNING)
    try:
        model = open_clip.create_model(name, pretrained_text=False)
    finally:
        logging.disable(logging.NOTSET)
    # OpenAI's own release (e.g. ViT-L-14.pt) is a TorchScript archive, which torch.load refuses under
    # weights_only=True; torch.jit.load restores tensors without unpickling arbitrary Python objects.
    state = (torch.jit.load(path, map_location="cpu").state_dict() if _is_torchscript(path)
             else load_state_dict(path))  # weights_only; strips 'module.' / 'state_dict'
    # Only the image tower is used, so only it is loaded -- strictly. Text-side differences are thus
    # irrelevant: LongCLIP-L is ViT-L-14 with 248 text positions (plus 'positional_embedding_res'),
    # which a strict full load rejects. Dropping the text tower also saves ~120M params for ViT-L.
    # NB OpenAI-trained weights (OpenAI CLIP, LongCLIP) used QuickGELU: name 'ViT-L-14-quickgelu'.
    model.visual.load_state_dict({k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")})
    cfg = model.visual.preprocess_cfg  # size, mean, std, interpolation, resize_mode (set by create_model)
    h, w = (cfg["size"], cfg["size"]) if isinstance(cfg["size"], int) else cfg["size"]
    if cfg["resize_mode"] == "squash":
        resize, crop = (h, w), None
    elif cfg["resize_mode"] == "shortest" and h == w:
        resize, crop = h, (h, w)
    else:
        raise ValueError(f"{spec}: unsupported open_clip preprocessing {cfg}")
    return Backbone(spec, model.visual, resize, crop, cfg["interpolation"], cfg["mean"], cfg["std"])


def _load_hf(spec: str, path: str) -> Backbone:
    from transformers import AutoConfig, AutoImageProcessor, AutoModel
    model_type = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=False).model_type
    if model_type not in HF_TYPES:  # each type's feature is chosen by HFImageTower
        raise ValueError(f"{spec}: model_type '{model_type}' is not one of {HF_TYPES}")
    model = AutoModel.from_pretrained(path, local_files_only=True, trust_remote_code=False, dtype=torch.float32)
    # backend "pil": the slow processor that transformers 4 picked by default, hence the released scorer's;
    # DINOv3 has only a torchvision one, which transformers then falls back to (with a warning)
    proc = AutoImageProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=False, backend="pil")
    # CLIP: shortest side 224, center crop 224; DINOv2 (Bit): shortest side 256, crop 224; DINOv3: exact 224x224
    size = proc.size
    resize = size.shortest_edge if size.shortest_edge else (size.height, size.width)
    crop = (proc.crop_size.height, proc.crop_size.width) if getattr(proc, "do_center_crop", False) else None
    interpolation = "bilinear" if int(proc.resample) == 2 else "bicubic"  # PIL codes: 2 bilinear, 3 bicubic
    return Backbone(spec, HFImageTower(model), resize, crop, interpolation, proc.image_mean, proc.image_std, proc)


def parse_spec(spec: str) -> tuple[str, str, str]:
    """(kind, model name, path) of a backbone spec, checked without loading anything: a bad form is a
    ValueError, a missing file or directory a FileNotFoundError, each naming the spec (the scripts' config
    rules call this before any model is loaded)."""
    kind, _, rest = spec.partition(":")
    name, _, path = rest.partition(":")  # the checkpoint path may itself contain ':'
    if kind == "open_clip" and name and path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"open_clip checkpoint not found: '{path}' (spec '{spec}')")
        return kind, name, path
    if kind == "hf" and rest:
        if not os.path.isdir(rest):
            raise FileNotFoundError(f"model directory not found: '{rest}' (spec '{spec}')")
        return kind, "", rest
    raise ValueError(f"invalid backbone spec '{spec}'; valid forms: {SPEC_FORMS}")


def load_backbone(spec: str, device: str | torch.device | None = None) -> Backbone:
    """spec: 'open_clip:<model_name>:<checkpoint_file>' or 'hf:<local_dir>' (local files only)."""
    kind, name, path = parse_spec(spec)
    backbone = _load_open_clip(spec, name, path) if kind == "open_clip" else _load_hf(spec, path)
    return backbone.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row cosine similarity of paired (N, D) features, in fp32."""
    if a.shape != b.shape:
        raise ValueError(f"cosine needs paired features of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def reconstruction_reward(x: torch.Tensor, x_hat: torch.Tensor, backbone: Backbone) -> torch.Tensor:
    """r_i = cos(f(x_i), f(x_hat_i)). The source side never needs gradients; x_hat keeps them."""
    with torch.no_grad():
        source = backbone(x)
    return cosine(source, backbone(x_hat))


class ReconstructionReward:
    """The reconstruction reward with the source features f(x) cached by key: the sources are fixed
    during RL (and repeated group_size times per batch), so each one is embedded once."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.cache: dict[Hashable, torch.Tensor] = {}

    @torch.no_grad()
    def source_features(self, x: torch.Tensor, keys: Sequence[Hashable]) -> torch.Tensor:
        if len(keys) != len(x):
            raise ValueError(f"got {len(keys)} keys for {len(x)} images")
        todo: dict[Hashable, int] = {}  # first row of each uncached key
        for i, k in enumerate(keys):
            if k not in self.cache:
                todo.setdefault(k, i)
        if todo:
            self.cache.update(zip(todo, self.backbone(x[list(todo.values())])))
        return torch.stack([self.cache[k] for k in keys])

    def reconstruction_reward(self, x: torch.Tensor, x_hat: torch.Tensor, keys: Sequence[Hashable]) -> torch.Tensor:
        return cosine(self.source_features(x, keys), self.backbone(x_hat))

    # A source's features depend, at float rounding, on the batch it was first embedded in, so a resumed
    # run matches an uninterrupted one bit for bit only with the same cache: it goes in the checkpoint.
    def cache_state(self) -> dict:
        keys = list(self.cache)
        return {"keys": keys, "features": torch.stack([self.cache[k] for k in keys]).cpu() if keys else torch.empty(0)}

    def load_cache(self, state: dict | None):
        """Restore cache_state() (None: start empty, e.g. a checkpoint from another number of ranks)."""
        if state is not None:
            self.cache = dict(zip(state["keys"], state["features"].to(self.backbone.device)))


ADVANTAGE_STD = ("group", "batch")  # what group_advantages may normalise by


def group_advantages(rewards: torch.Tensor, group_size: int, std_over: str = "group") -> torch.Tensor:
    """GRPO advantages (Shao et al. 2024, DeepSeekMath, sec. 4.1.2; Flow-GRPO uses the same):
    A_i = (r_i - mean(r_group)) / (std + 1e-4), population std as in Flow-GRPO's np.std, where std is
    the group's own (std_over="group") or that of every reward in the batch (std_over="batch",
    Flow-GRPO's global_std). The group std turns a group whose members differ only by noise (every
    image right, rewards apart by 0.01) into advantages of +-1, as loud as a group with a real error;
    the batch std keeps such a group's advantages as small as its spread.
    rewards: (N,), consecutive runs of group_size rows form one group."""
    if rewards.ndim != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if std_over not in ADVANTAGE_STD:
        raise ValueError(f"std_over must be one of {ADVANTAGE_STD}, got {std_over!r}")
    r = rewards.float().view(-1, group_size)
    std = r.std(1, correction=0, keepdim=True) if std_over == "group" else r.std(correction=0)
    adv = (r - r.mean(1, keepdim=True)) / (std + 1e-4)
    # a group with no reward spread carries no signal; its float mean can differ from the members by
    # an ulp, which the 1e-4 denominator would turn into noise rather than exactly 0
    flat = r.amax(1, keepdim=True) == r.amin(1, keepdim=True)
    return adv.masked_fill(flat, 0.0).view(-1)
