"""Our model checkpoints, for both architectures (UAE in model.py, UMM2 in umm2.py): a folder of named parts.

A checkpoint is a directory with model.json (the architecture, where each part lives, the adapters to merge
into it, the class's own settings) and the parts a stage trained, each in its library's own layout
(save_pretrained), beside what the class writes itself (the UAE's projector.safetensors). The parts it did
not train are referenced where they already live, relative when beside it, so a stage re-saves only what it
changed and an out/ folder moves as a whole; a LoRA stage saves its adapter alone, merged into its base on
loading. save_parts / read_parts / merge_adapters are the steps UAE's and UMM2's save / load share, and
load_autoencoder picks the class by model.json's architecture. A run's own checkpoint
(common.save_checkpoint) is one of these plus the training state.
"""
import contextlib
import os

import torch
import torch.nn as nn

from common import CheckpointError, check_files, read_json, require_keys, SOURCE_REMEDY
from lora import lora_merged, merge_lora, save_lora


def load_autoencoder(directory: str, dtype=torch.float32, remedy: str = SOURCE_REMEDY):
    """The auto-encoder a checkpoint holds, of the "architecture" its model.json names (UAE or UMM2; written
    before the key: UAE), so that one script per stage serves both (the RL stages, eval_unified)."""
    path = os.path.join(directory, "model.json")
    meta = read_json(path, remedy) if os.path.exists(path) else {}
    if isinstance(meta, dict) and meta.get("architecture") == "UMM2":
        import umm2  # here, not at the top: both classes build on this module
        return umm2.UMM2.load(directory, dtype, remedy=remedy)
    from model import UAE
    return UAE.load(directory, dtype, remedy=remedy)  # a missing or other model.json is named by read_parts


def save_parts(model, directory: str, trained) -> tuple[dict, dict]:
    """The parts of a model (model.PARTS, each an attribute with save_pretrained) into a checkpoint directory:
    the `trained` ones written in their standard layouts (merged: earlier adapters included), every other one
    referenced where it lives (model.sources), relative when it is beside this checkpoint (a stage of the
    same out/ folder), so the folder moves as a whole. A part trained through adapters on weights that live
    elsewhere (a LoRA stage) is saved as its adapter alone; every adapter (model.lora) is written in ours and
    peft's layout. Returns model.json's "parts" and "adapters" (per part, the adapter directories to add to
    it in order when loading, earlier stages' first)."""
    os.makedirs(directory, exist_ok=True)
    home = os.path.dirname(os.path.abspath(directory))

    def ref(path: str) -> str:
        path = os.path.abspath(path)
        return os.path.relpath(path, os.path.abspath(directory)) if os.path.commonpath([path, home]) == home else path
    parts, adapters = {}, {}
    for part in model.PARTS:
        adapter_only = part in model.lora and part in model.sources
        if part in trained and not adapter_only:
            obj = getattr(model, part)
            with lora_merged(obj) if isinstance(obj, nn.Module) else contextlib.nullcontext():
                obj.save_pretrained(os.path.join(directory, part))
            parts[part] = part
            continue
        if part not in model.sources:
            raise ValueError(f"{type(model).__name__}.save: part '{part}' was built in memory and must be in "
                             f"trained={trained}")
        parts[part] = ref(model.sources[part])
        stack = [ref(a) for a in model.adapters.get(part, [])] + ([f"lora_{part}"] if part in trained else [])
        if stack:
            adapters[part] = stack
    for part, spec in model.lora.items():  # the adapter's base is the unmerged part it was trained on
        base = os.path.abspath(model.sources[part]) if part in model.sources else ""
        save_lora(getattr(model, part), os.path.join(directory, f"lora_{part}"), spec["r"], spec["alpha"], base)
    return parts, adapters


def read_parts(directory: str, architecture: str, parts: tuple, remedy: str = SOURCE_REMEDY,
               required: tuple = ()) -> tuple[dict, dict]:
    """A checkpoint's model.json and the directory of each of its parts (stored relative or absolute), after
    checking that it holds `architecture` (the class name; checkpoints written before the key are UAE's),
    names every one of `parts`, has the `required` keys, and that every file of it and of its parts and adapters is whole
    (common.check_files): a damaged one is named, with `remedy`."""
    meta_path = os.path.join(directory, "model.json")
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: not a checkpoint of this project (no model.json)")
    meta = read_json(meta_path, remedy)
    if isinstance(meta, dict) and meta.get("architecture", "UAE") != architecture:
        raise ValueError(f"{meta_path} holds a {meta['architecture']} checkpoint, not a {architecture} one: "
                         f"load it with {meta['architecture']}.load")
    require_keys(meta, meta_path, ("parts",) + tuple(required), remedy)  # its keys, once the architecture is known
    if not isinstance(meta["parts"], dict) or set(parts) - set(meta["parts"]):
        raise CheckpointError(f"{meta_path}: \"parts\" must name the directory of each of {', '.join(parts)}; {remedy}")
    paths = {part: os.path.normpath(os.path.join(directory, p)) for part, p in meta["parts"].items()}
    for part, path in paths.items():
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{meta_path}: part '{part}' points to missing directory {path}; {remedy}")
    adapters = [os.path.normpath(os.path.join(directory, d)) for stack in meta.get("adapters", {}).values() for d in stack]
    for path in dict.fromkeys([directory, *paths.values(), *adapters]):
        if os.path.isdir(path):  # a missing adapter directory is named by merge_lora
            check_files(path, remedy)
    return meta, paths


def merge_adapters(model, meta: dict, directory: str):
    """A LoRA stage's part: its base + every stage's adapter, merged in order (model.adapters remembers them)."""
    for part, stack in meta.get("adapters", {}).items():
        model.adapters[part] = [os.path.normpath(os.path.join(directory, d)) for d in stack]
        for adapter in model.adapters[part]:
            merge_lora(getattr(model, part), adapter)
