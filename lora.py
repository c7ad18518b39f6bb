"""Hand-written LoRA (Hu et al. 2021) for the LLM and the DiT: inject, switch off (the GRPO reference
policy without a second copy in memory), merge, and save in our layout and in peft's.
"""
import contextlib
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from common import CheckpointError, check_files, RESUME_REMEDY

# ============================================================================ LoRA (hand-written)


class LoRALinear(nn.Module):
    """y = W x + (alpha / r) * B A x, with B = 0 at init so the adapted model starts as the base
    (Hu et al. 2021). `enabled = False` gives back the base layer: the GRPO reference model."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.base, self.r, self.scale, self.enabled = base, r, alpha / r, True
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=torch.float32))
        nn.init.normal_(self.lora_A, std=1 / r)  # peft's "gaussian" init: A ~ N(0, (1/r)^2)

    def forward(self, x):
        y = self.base(x)
        if not self.enabled:
            return y
        return y + (F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B) * self.scale).to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """A new nn.Linear with W + scale * B A (the base layer itself is left untouched). skip_init: a
        random init would be overwritten anyway, and drawing it would shift the RNG streams of a run that
        saves (merging is how checkpoints are written), so a resumed run would no longer match it."""
        out = torch.nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,
                                       bias=self.base.bias is not None, device=self.base.weight.device,
                                       dtype=self.base.weight.dtype)
        out.weight.copy_(self.base.weight + (self.lora_B @ self.lora_A * self.scale).to(self.base.weight.dtype))
        if self.base.bias is not None:
            out.bias.copy_(self.base.bias)
        return out


def inject_lora(module: nn.Module, target_names: list[str], r: int, alpha: float) -> list[str]:
    """Wrap every nn.Linear whose dotted name ends with one of `target_names` (q_proj, to_out.0); returns
    the dotted names wrapped. Base weights are frozen; only A and B train."""
    wrapped = []
    for name, child in list(module.named_modules()):
        if isinstance(child, nn.Linear) and any(name == t or name.endswith("." + t) for t in target_names):
            child.requires_grad_(False)
            _set_child(module, name, LoRALinear(child, r, alpha))
            wrapped.append(name)
    if not wrapped:
        raise ValueError(f"inject_lora: no nn.Linear named any of {target_names} in {type(module).__name__}")
    return wrapped


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def lora_disabled(module: nn.Module):
    """The reference policy of GRPO is the same network with its adapters off: no second copy."""
    layers = lora_layers(module).values()
    for m in layers:
        m.enabled = False
    try:
        yield
    finally:
        for m in layers:
            m.enabled = True


def _set_child(module: nn.Module, dotted: str, child: nn.Module):
    parent, _, name = dotted.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, name, child)


@contextlib.contextmanager
def lora_merged(module: nn.Module):
    """Temporarily swap adapters for merged plain Linears, so save_pretrained writes the standard layout."""
    layers = lora_layers(module)
    for name, m in layers.items():
        _set_child(module, name, m.merged())
    try:
        yield
    finally:
        for name, m in layers.items():
            _set_child(module, name, m)


def lora_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{name}.lora_{ab}": getattr(m, f"lora_{ab}").detach().cpu().contiguous()
            for name, m in lora_layers(module).items() for ab in "AB"}


def save_lora(module: nn.Module, directory: str, r: int, alpha: float, base_path: str = ""):
    """Two layouts: ours (`lora.safetensors`, our module names) and peft's (`adapter_config.json` +
    `adapter_model.safetensors` with `base_model.model.<name>.lora_A.weight` keys), so the wider
    ecosystem can load the adapter onto the base model at base_path (the weights it was trained on).
    target_modules lists the adapted modules' full names: peft matches an entry against every module
    name's suffix, and a bare "gate_proj" would also adapt Qwen2.5-VL's vision MLPs."""
    ours = lora_state_dict(module)
    os.makedirs(directory, exist_ok=True)
    save_file(ours, os.path.join(directory, "lora.safetensors"))
    peft = {f"base_model.model.{k.rsplit('.lora_', 1)[0]}.lora_{k[-1]}.weight": v for k, v in ours.items()}
    save_file(peft, os.path.join(directory, "adapter_model.safetensors"))
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "task_type": None, "r": r, "lora_alpha": alpha, "lora_dropout": 0.0,
                   "target_modules": sorted(lora_layers(module)), "bias": "none", "fan_in_fan_out": False,
                   "base_model_name_or_path": base_path, "init_lora_weights": "gaussian"}, f, indent=1)


@torch.no_grad()
def merge_lora(module: nn.Module, directory: str):
    """Add an adapter saved by save_lora into its base layers for good, W += alpha / r * B A, as
    LoRALinear.merged computes it (so a LoRA stage's checkpoint holds only its adapter, and loading it
    gives the same weights a merged copy would)."""
    path = os.path.join(directory, "lora.safetensors")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: adapter missing (the checkpoint's model.json lists it under \"adapters\")")
    with open(os.path.join(directory, "adapter_config.json")) as f:
        config = json.load(f)
    state, scale = load_file(path), config["lora_alpha"] / config["r"]
    for name in sorted({key.rsplit(".lora_", 1)[0] for key in state}):
        try:
            layer = module.get_submodule(name)
        except AttributeError:
            raise KeyError(f"{path}: adapter for '{name}' but {type(module).__name__} has no such layer") from None
        layer.weight += (state[f"{name}.lora_B"] @ state[f"{name}.lora_A"] * scale).to(layer.weight.dtype)


def load_lora(module: nn.Module, directory: str, remedy: str = RESUME_REMEDY):
    """Put a resumed run's saved adapters back into the module's LoRA layers (a damaged file is named)."""
    if not os.path.isfile(os.path.join(directory, "lora.safetensors")):
        raise CheckpointError(f"{directory}/lora.safetensors is missing: the checkpoint is damaged; {remedy}")
    check_files(directory, remedy)
    state = load_file(os.path.join(directory, "lora.safetensors"))
    layers = lora_layers(module)
    for key, value in state.items():
        name, ab = key.rsplit(".lora_", 1)
        if name not in layers:
            raise KeyError(f"{directory}/lora.safetensors: adapter for '{name}' but the model has no LoRA layer there")
        getattr(layers[name], f"lora_{ab}").data.copy_(value)
