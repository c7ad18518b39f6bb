"""What every stage script shares besides the model: the runtime and the checkpoints.

Runtime: device and dtype, torchrun detected from the environment (one process per GPU, or per CPU
thread pair here), seeds, and the one precision context every forward runs in. Checkpoints: written
atomically (a kill mid-save leaves the previous one intact), holding the optimizer, the step and every
rank's RNG state, so a resumed run continues bit for bit (DESIGN §8); relocatable.
"""
import contextlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from configurator import above, at_least, between, check, must, one_of
from reward import parse_spec

# ============================================================================ runtime


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    dtype: torch.dtype  # the one compute precision, applied through autocast()

    @property
    def master(self) -> bool:
        return self.rank == 0

    def autocast(self, training: bool = False):
        """The compute precision. `training=True` (a forward that will be backpropagated) on the CPU also
        selects the math attention kernel: the CPU flash kernel's backward is slow at our short
        sequences (measured here: a DiT step of 64 took 200 -> 146 ms, a captioning step 330 -> 285 ms),
        while for sampling flash is faster (Unified-Bench eval 11.7 -> 9.8 s), so no-grad code keeps it."""
        stack = contextlib.ExitStack()
        if self.dtype != torch.float32:
            stack.enter_context(torch.autocast(self.device.type, dtype=self.dtype))
        stack.enter_context(self.attention_kernel(training))
        return stack

    def attention_kernel(self, training: bool = False):
        """autocast's attention-kernel choice alone: a backward that recomputes checkpointed blocks must
        run them with the kernel of their forward."""
        return sdpa_kernel(SDPBackend.MATH) if training and self.device.type == "cpu" else contextlib.nullcontext()

    def print(self, *args, **kwargs):
        if self.master:
            print(*args, **kwargs, flush=True)

    def per_rank(self, total: int, key: str) -> int:
        """A global batch size of the config (DESIGN §8), split over the ranks: it must divide evenly."""
        if total % self.world_size:
            raise ValueError(f"{key}={total} must divide over {self.world_size} ranks")
        return total // self.world_size


DTYPES = ("auto", "float32", "bfloat16", "float16")
WEIGHTS_DTYPES = ("float32", "bfloat16", "float16")
# config keys a resumed run may change: when it stops, what it prints, where things are, how fast it runs
RESUMABLE_CHANGES = {"max_steps", "resume", "out_dir", "data_dir", "init_from", "log_interval", "eval_interval",
                     "save_interval", "max_bad_steps", "threads", "device", "eval_n", "probe_n", "vae_dir", "tokenizer_dir",
                     "qwen_dir", "sd3_dir", "reward_backbone", "compile"}


# ============================================================================ config rules (configurator.configure)

def device_rule(value: str, cfg) -> str | None:
    """auto, cpu, cuda or cuda:<index> of a GPU this machine has."""
    if value == "auto":
        return None
    try:
        device = torch.device(value)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        return "must be auto, cpu, cuda or cuda:<index>"
    if device.type == "cuda" and not torch.cuda.is_available():
        return "names a CUDA device, but torch sees no GPU here: use auto or cpu"
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        return f"must be a GPU this machine has: cuda:0 .. cuda:{torch.cuda.device_count() - 1}"
    return None


def out_dir_rule(value: str, cfg) -> str | None:
    """A directory, or a path where one can be created (checked before the run, not at its first save), and
    not the checkpoint the run starts from (a save would replace it)."""
    if not value.strip():
        return "out_dir is empty: give the directory the outputs go to"
    if os.path.exists(value) and not os.path.isdir(value):
        return "is a file, not a directory: give another out_dir"
    existing = os.path.abspath(value)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        return f"cannot be created: {existing} is a file"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot be written: {existing} is not writable"
    if getattr(cfg, "init_from", "") and os.path.abspath(value) == os.path.abspath(cfg.init_from):
        return "is init_from: a save would replace the checkpoint the run starts from; give another out_dir"
    return None


def checkpoint_rule(*words: str, kind: str = "UAE"):
    """A `kind` (UAE, UMM2) checkpoint directory (model.json, written by a stage's save), or one of `words` ("scratch")."""
    def rule(value: str, cfg) -> str | None:
        if value in words:
            return None
        if os.path.isfile(os.path.join(value, "model.json")):
            return None
        what = " or ".join([repr(w) for w in words] + [f"a {kind} checkpoint directory (a folder with model.json)"])
        return f"must be {what}: " + ("it has no model.json" if os.path.isdir(value) else "no such directory")
    return rule


def folder_rule(*files: str):
    """A directory holding `files` (a dataset's train.jsonl, a tokenizer's tokenizer.json, a model's config.json)."""
    def rule(value: str, cfg) -> str | None:
        if not os.path.isdir(value):
            return "no such directory" + (f" (it must hold {', '.join(files)})" if files else "")
        missing = [f for f in files if not os.path.isfile(os.path.join(value, f))]
        return f"the directory has no {', '.join(missing)}" if missing else None
    return rule


def spec_rule(optional: bool = False):
    """A backbone spec (reward.parse_spec: its form, and that its file exists); optional: "" = skipped."""
    def rule(value: str, cfg) -> str | None:
        if optional and not value:
            return None
        try:
            parse_spec(value)
        except (ValueError, FileNotFoundError) as e:
            return str(e)
        return None
    return rule


# The keys several scripts share, with one meaning everywhere; each script adds its own rules (a key of both
# takes the script's). Checked by configure before anything is loaded.
RULES = dict(
    data_dir=folder_rule("train.jsonl", "val.jsonl"),  # a dataset folder (DESIGN §5)
    init_from=checkpoint_rule(),  # the checkpoint a stage starts from
    out_dir=out_dir_rule,  # where the outputs go
    reward_backbone=spec_rule(),  # reward.py spec
    weights_dtype=one_of(*WEIGHTS_DTYPES),  # dtype checkpoints are loaded in
    image_size=at_least(0, "0 = the size the model draws"),  # side images are resized to on load
    max_steps=at_least(1),  # optimizer steps
    batch_size=at_least(1),  # global batch
    micro_batch=at_least(0, "0 = the whole batch at once"),  # rows per forward/backward
    fsdp=must(lambda v, c: not v or int(os.environ.get("WORLD_SIZE", "1")) > 1,
              "False outside a torchrun launch of 2+ processes (FSDP shards over the ranks)"),
    lr=at_least(0.0),  # learning rates: 0 runs (nothing moves)
    lr_lora=at_least(0.0),
    lr_decoder=at_least(0.0),
    warmup=at_least(0),  # warmup steps
    weight_decay=at_least(0.0),  # AdamW weight decay
    grad_clip=above(0.0, "the max gradient norm: 0 would zero every gradient; a large value clips nothing"),
    lora_r=at_least(1),  # LoRA rank
    lora_alpha=above(0.0),  # LoRA alpha
    temperature=above(0.0, "the captions' sampling temperature; greedy captions have their own switch"),
    max_new_tokens=at_least(0, "0 = the decoder's window"),  # caption length cap (the window's bound: model.caption_cap)
    sample_steps=at_least(1),  # sampler steps
    cfg_scale=at_least(0.0, "1 = no guidance"),  # classifier-free guidance
    group_size=at_least(2, "GRPO's advantages compare the samples of a group: one sample has nothing to compare"),
    beta=at_least(0.0),  # KL weight
    anchor_weight=at_least(0.0),  # drift penalty weight
    eval_interval=at_least(1),  # steps between probes (a large value: only at the end)
    log_interval=at_least(1),  # steps between log lines
    save_interval=at_least(1),  # steps between checkpoints (the last step always saves)
    eval_n=at_least(1),  # val examples per probe
    probe_n=at_least(1),
    max_bad_steps=at_least(1),  # non-finite steps in a row before stopping
    device=device_rule,  # auto | cpu | cuda | cuda:N
    dtype=one_of(*DTYPES),  # compute precision
    seed=between(0, 2 ** 31 - 1),  # numpy takes seeds (+ rank) below 2^32
    threads=at_least(0, "0 = torch's default"),  # CPU threads
)


def setup_runtime(device: str = "auto", dtype: str = "auto", seed: int = 0, training: bool = False) -> Runtime:
    """Detect torchrun (RANK / LOCAL_RANK / WORLD_SIZE), pick the device, seed with base + rank. Training
    never runs in float16: its gradients underflow without loss scaling, which these scripts do not do."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if device == "cuda":  # no index: this process's GPU
        device = f"cuda:{local_rank}"
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: must be one of {', '.join(DTYPES)}")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if dtype == "auto":  # bf16 where the hardware has it: ~2.7x the fp32 matmul rate even on these CPUs (DESIGN §9)
        dtype = "bfloat16" if device.type == "cpu" or torch.cuda.is_bf16_supported() else \
            "float32" if training else "float16"
    if training and dtype == "float16":
        raise ValueError("dtype=float16 needs loss scaling, which the training scripts do not do: "
                         "use bfloat16 or float32")
    seed_everything(seed + rank)
    return Runtime(rank, local_rank, world, device, getattr(torch, dtype))


def start_run(cfg) -> tuple[Runtime, dict | None]:
    """What every training script does first: CPU threads, the runtime, and the state to resume from
    (None for a fresh run). A run whose saved step reached cfg.max_steps is complete: (rt, "complete")."""
    check(cfg, {k: RULES[k] for k in ("out_dir", "max_steps")})  # configure checked them; a caller of start_run alone too
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = setup_runtime(cfg.device, cfg.dtype, cfg.seed, training=True)
    rt.print("config " + json.dumps(vars(cfg)))  # the final one, after files and flags (also in every checkpoint)
    old = cfg.out_dir.rstrip("/") + ".old"
    if rt.master and not os.path.exists(cfg.out_dir) and os.path.exists(os.path.join(old, "training_state.pt")):
        os.replace(old, cfg.out_dir)  # killed between atomic_dir's two renames: the previous checkpoint is whole
        rt.print(f"recovered {cfg.out_dir} from {old} (a save was interrupted)")
    if dist.is_initialized():
        dist.barrier()  # every rank reads the recovered directory
    state = load_training_state(cfg.out_dir) if cfg.resume else None
    changed = sorted(k for k, v in (state or {}).get("config", {}).items()
                     if k not in RESUMABLE_CHANGES and k in vars(cfg) and getattr(cfg, k) != v)
    if changed:
        saved = state["config"]
        raise ValueError(f"{cfg.out_dir} holds a run with another config: " + ", ".join(
            f"{k} {saved[k]!r} there, {getattr(cfg, k)!r} now" for k in changed) +
            ". Resume with its settings, or start afresh with --resume=False or another out_dir")
    if state is not None and state["step"] >= cfg.max_steps:
        rt.print(f"{cfg.out_dir} is complete (step {state['step']}); nothing to do")
        return rt, "complete"
    return rt, state


def end_run(rt: Runtime, step: int, t0: float):
    rt.print(f"done: {step} steps in {time.time() - t0:.0f}s")
    if dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def group_reward_stats(rewards: torch.Tensor, group_size: int) -> dict:
    """Reward mean / std and the fraction of groups whose rewards are all equal (no GRPO signal),
    averaged over ranks."""
    groups = rewards.view(-1, group_size)
    zero_std = (groups.max(1).values == groups.min(1).values).float().mean()
    return {"reward_mean": all_reduce_mean(rewards.mean()).item(), "reward_std": all_reduce_mean(rewards.std()).item(),
            "zero_std_groups": all_reduce_mean(zero_std).item()}


def rng_state() -> dict:
    """All RNG states in types torch.load(weights_only=True) accepts (numpy's key array as a tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def gather_ranks(obj) -> list:
    """obj from every rank, in rank order: a collective (every rank calls it)."""
    if not dist.is_initialized():
        return [obj]
    objs = [None] * dist.get_world_size()
    dist.all_gather_object(objs, obj)
    return objs


def own_rank(states: list | None):
    """This rank's entry of a gather_ranks list saved in a checkpoint; None if there is none for it (no
    list, or one written by a different number of ranks)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    return states[rank] if isinstance(states, list) and len(states) == world else None


def rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order: a collective (save_checkpoint calls it on every rank).
    Resuming gives each rank its own streams back; saving the master's alone would hand rank 0's streams
    to every rank, so they would all draw the same batches."""
    return gather_ranks(rng_state())


def set_rng_state(states: list[dict] | dict):
    """Restore this rank's streams from rng_states(). Call it last before the loop: start-up draws random
    numbers too (LoRA inits, building a reward backbone), and a continuous run drew those before its
    first step. A checkpoint written by a different number of ranks (or before checkpoints held one state
    per rank: a dict) keeps the fresh seed + rank streams."""
    states = [states] if isinstance(states, dict) else states
    state = own_rank(states)
    if state is None:
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        print(f"rank {rank}: checkpoint RNG from {len(states)} rank(s), running {world}: keeping fresh RNG streams")
        return
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ============================================================================ checkpoints

def atomic_dir(final: str):
    """Write a directory under a temporary name and rename it into place: a kill mid-save leaves the
    previous checkpoint intact (DESIGN §8). Use as: with atomic_dir(path) as tmp: write into tmp."""
    @contextlib.contextmanager
    def ctx():
        tmp = final.rstrip("/") + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        yield tmp
        old = final.rstrip("/") + ".old"
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    return ctx()


def lr_at(step: int, max_steps: int, lr: float, warmup: int, min_ratio: float = 0.1) -> float:
    """Linear warmup, then cosine decay to min_ratio * lr (nanoGPT's schedule)."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def broadcast_from_master(params: list[nn.Parameter]):
    """Give every rank rank 0's values of the trained parameters. Their random inits (a new LoRA's A, a
    fresh network) are drawn from per-rank seeds (seed + rank), and averaged gradients only make sense
    for one model; frozen weights come from the same checkpoint on every rank, so they are not sent."""
    if dist.is_initialized():
        for p in params:
            dist.broadcast(p.data, src=0)


def all_reduce_grads(params):
    """Data parallelism made explicit: average gradients over ranks after backward (gloo or nccl). Sharded
    parameters (FSDP, common.shard) are skipped: their backward already reduced them."""
    if dist.is_initialized():
        for p in params:
            if p.grad is not None and not hasattr(p, "device_mesh"):
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


def micro_slices(n: int, size: int) -> list[slice]:
    """A rank's batch of n rows in micro-batches of `size` rows (0 = all at once; the last may be short):
    each is forwarded and backpropagated alone, its loss weighted by its share, so that the gradients add
    up to the whole batch's and per-GPU memory is set by `size`, not by the batch."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def all_finite(*values: torch.Tensor) -> bool:
    """True when every value is finite on every rank (an all-reduce MIN of the local verdict): the
    ranks skip the same steps, so their collectives stay paired. A rank that skipped alone would
    leave the others waiting in all_reduce_grads."""
    local = all(bool(torch.isfinite(v).all()) for v in values)
    if not dist.is_initialized():
        return local
    flag = torch.tensor(float(local), device=values[0].device)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return flag.item() == 1.0


class NonFiniteGuard:
    """DESIGN §8: a NaN/Inf reward or loss skips the update with a warning, and max_bad such steps in a
    row stop the run (the last good checkpoint stays in out_dir). Feed it all_finite's verdict, which
    every rank shares, so every rank raises together."""

    def __init__(self, rt: Runtime, max_bad: int, out_dir: str):
        self.rt, self.max_bad, self.out_dir, self.bad = rt, max_bad, out_dir, 0

    def passed(self, finite: bool, step: int) -> bool:
        if finite:
            self.bad = 0
            return True
        self.bad += 1
        self.rt.print(f"warning: step {step} non-finite reward or loss, update skipped ({self.bad} in a row)")
        if self.bad >= self.max_bad:
            raise RuntimeError(f"{self.max_bad} non-finite steps in a row: stopping (last good checkpoint in {self.out_dir})")
        return False


# ============================================================================ sharding (FSDP2)

def shard(modules: list[nn.Module], compute_dtype: torch.dtype):
    """FSDP2 (torch.distributed.fsdp.fully_shard) over every rank: each module's repeated blocks (a DiT's
    transformer_blocks), then the module. Parameters stay fp32 masters, and they, their gradients and the
    AdamW state are split over the ranks; each block is gathered in compute_dtype for its forward and
    backward only, gradients are reduced in fp32 (all_reduce_grads leaves them alone)."""
    from torch.distributed.fsdp import fully_shard, MixedPrecisionPolicy
    if not dist.is_initialized():
        raise ValueError("fsdp=True shards over the ranks of a torchrun launch: run under torchrun")
    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for m in modules:
        m.float()
        for block in getattr(m, "transformer_blocks", []):
            fully_shard(block, mp_policy=policy)
        fully_shard(m, mp_policy=policy)


def reshard(modules: list[nn.Module]):
    """Free the gathered weights of sharded modules. FSDP2 keeps a root module gathered after a forward
    that has no backward (sampling, probes), with plain tensors in place of its sharded parameters, which
    the optimizer and the checkpoint hold: call this after such a forward."""
    from torch.distributed.fsdp import FSDPModule
    for m in modules:
        for sub in m.modules():
            if isinstance(sub, FSDPModule):
                sub.reshard()


def clip_grad_norm(params, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ over parameters of which some may be sharded (DTensors) and some not (LoRA beside an
    FSDP decoder): each kind's norm whole, then one clip of all by the combined norm."""
    groups = [[p for p in params if p.grad is not None and hasattr(p, "device_mesh") == sharded] for sharded in (True, False)]
    norms = [torch.nn.utils.get_total_norm([p.grad for p in g]) for g in groups if g]
    norms = [n.full_tensor() if hasattr(n, "full_tensor") else n for n in norms]
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms])) if norms else torch.tensor(0.0)
    for g in groups:
        if g:
            torch.nn.utils.clip_grads_with_norm_(g, max_norm, total)
    return total


def load_full_state(module: nn.Module, state: dict):
    """load_state_dict of whole tensors (a checkpoint's) into a module, sharded (this rank's shards) or not."""
    if not is_sharded(module):
        return module.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, StateDictOptions
    set_model_state_dict(module, state, options=StateDictOptions(full_state_dict=True))


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(module, FSDPModule)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on the CPU: a sharded one (DTensor) is gathered, a collective every rank calls."""
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().cpu()


def like_param(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` (a saved whole tensor) laid out as `param`: this rank's shard of it when param is sharded."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import distribute_tensor
        return distribute_tensor(full.to(param.device, param.dtype), param.device_mesh, param.placements)
    return full.to(param.device, param.dtype)


@contextlib.contextmanager
def full_state_dicts(modules: list[nn.Module]):
    """While inside, each sharded module's state_dict() on rank 0 returns its whole weights on the CPU, so
    that save_pretrained and model.save write ordinary files. Every rank enters (the gathering is a
    collective); unsharded modules are left alone."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, StateDictOptions
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    patched = []
    for m in modules:
        if is_sharded(m):
            full = get_model_state_dict(m, options=options)
            m.state_dict = lambda *args, _full=full, **kwargs: _full
            patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.state_dict


def optimizer_state(optimizer, modules: list[nn.Module]) -> dict:
    """The optimizer's state to save: whole tensors keyed by parameter name when `modules` are sharded (a
    collective; loadable in any world size), else the ordinary state_dict."""
    if not any(is_sharded(m) for m in modules):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, StateDictOptions
    return get_optimizer_state_dict(nn.ModuleList(modules), optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(optimizer, modules: list[nn.Module], state: dict):
    if not any(is_sharded(m) for m in modules):
        return optimizer.load_state_dict(state)
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict, StateDictOptions
    set_optimizer_state_dict(nn.ModuleList(modules), optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_checkpoint(out_dir: str, model, trained, optimizer, step: int, config: dict,
                    extra: dict | None = None, history: list[dict] | None = None, rank_state=None, sharded=()):
    """Atomically write weights (model.save), optimizer, step, config and every rank's RNG state into
    out_dir. Every rank calls it (gathering the RNG states is a collective); rank 0 alone writes. An RL
    run's per-step `history` also goes in, as log.jsonl and reward_curve.png; `rank_state` is what each
    rank keeps for itself (the reward's source-feature cache), saved as a list in rank order. `sharded`:
    the modules under FSDP (shard), whose weights and optimizer state are gathered whole, so the checkpoint
    loads in any world size."""
    from data import plot_curve
    rng = rng_states()
    per_rank = gather_ranks(rank_state) if rank_state is not None else None
    opt_state = optimizer_state(optimizer, list(sharded))
    with full_state_dicts(list(sharded)):
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        with atomic_dir(out_dir) as tmp:
            model.save(tmp, trained)
            torch.save({"optimizer": opt_state, "step": step, "config": config, "rng": rng,
                        "rank_state": per_rank, "history": history, **(extra or {})},
                       os.path.join(tmp, "training_state.pt"))
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(config, f, indent=1)
            if history is not None:
                with open(os.path.join(tmp, "log.jsonl"), "w") as f:  # every step so far, one JSON line each
                    f.writelines(json.dumps(row) + "\n" for row in history)
                plot_curve([row["reward_mean"] for row in history], os.path.join(tmp, "reward_curve.png"), "reward mean")


def load_training_state(directory: str) -> dict | None:
    path = os.path.join(directory, "training_state.pt")
    if not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated or not a checkpoint: say which file, and what to do
        raise damaged(path, e, RESUME_REMEDY) from None


# What to do about a damaged file: in the run being resumed (its out_dir), or in the checkpoint it starts from
RESUME_REMEDY = "start afresh with --resume=False or another out_dir"
SOURCE_REMEDY = "re-run the stage that wrote it (into a fresh out_dir), or start from another checkpoint"


class CheckpointError(ValueError):
    pass


def damaged(path: str, error: Exception, remedy: str) -> CheckpointError:
    return CheckpointError(f"{path} cannot be read ({type(error).__name__}: {str(error)[:200]}): the checkpoint is "
                           f"damaged; {remedy}")


def check_files(directory: str, remedy: str):
    """Name the first unreadable file of a checkpoint directory before a library reads it (whose error would
    not say which file): a safetensors file whose header promises more bytes than the file holds (cut by a
    full disk or a copy stopped midway), or a .json file that does not parse."""
    from safetensors import safe_open
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            if name.endswith(".safetensors"):
                with safe_open(path, "pt"):  # reads and checks the header only
                    pass
            elif name.endswith(".json"):
                with open(path, "rb") as f:
                    json.loads(f.read())
        except Exception as e:
            raise damaged(path, e, remedy) from None


@contextlib.contextmanager
def reading(path: str, remedy: str):
    """Inside, an error of a library reading `path` (a checkpoint's part, a config that does not fit its
    weights) becomes one that names it, with the remedy."""
    try:
        yield
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise damaged(path, e, remedy) from None


def read_json(path: str, remedy: str, required: tuple = ()) -> dict:
    """A checkpoint's JSON file (model.json, adapter_config.json): unreadable, not an object or without a
    required key, it is named with the remedy."""
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
    except Exception as e:
        raise damaged(path, e, remedy) from None
    return require_keys(meta, path, required, remedy)


def require_keys(meta, path: str, required: tuple, remedy: str) -> dict:
    """meta (read from path), after checking it is an object holding every `required` key."""
    missing = [k for k in required if not isinstance(meta, dict) or k not in meta]
    if missing:
        raise CheckpointError(f"{path} has no {', '.join(map(repr, missing))}: the checkpoint is damaged or was "
                              f"not written by this code; {remedy}")
    return meta
