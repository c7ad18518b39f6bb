"""A memory and time plan of every paper-scale stage, per GPU, from the real models' sizes (issue 24).

Builds Qwen2.5-VL-3B-Instruct, SD3.5-Large's MM-DiT and VAE and the CLIP ViT-L/14 reward on the meta
device from their released configs (below; no weights, nothing downloaded), reads each stage's defaults
with its config/paper_*.py exactly as the script would, and prints per GPU: weights, gradients, AdamW
state, EMA, activations of one micro-batch, the largest no-grad pass (rollouts, VAE), FSDP's gathered
buffers, the total and whether it fits; then FLOPs per step and the step time at a stated MFU.

    python plan.py                                   # 8 x 80 GB, H100 bf16 peak, MFU 0.35
    python plan.py --n_gpus=16 --gpu_gb=141 --peak_tflops=989 --mfu=0.4
    python plan.py --stages=pretrain_decoder --overrides="micro_batch=1"

What follows from counts and dtypes is exact: parameters are counted on the meta device; gradients,
AdamW's two moments and the EMA have the dtypes the scripts give them (FSDP2 via common.shard: fp32
masters split over the GPUs; DDP: the loaded dtype, replicated). What the scripts shard is read from
their code: pretrain_decoder and cold_start shard projector + DiT when fsdp=True; the LoRA stages and eval
have no fsdp key, so their FSDP row is their DDP row. Activations are a model: the bytes each op saves for
the backward, summed per layer from shapes (tokens, width, heads, MLP width, LoRA rank, dtype), assuming
flash / memory-efficient attention (no L^2 term) and CUDA autocast (layer and group norms in fp32). It is
checked against storages measured on tiny models on the CPU (test_smoke.py -k plan, within 20%). The
no-grad peaks, FSDP's buffers and the cold-start terms marked so are estimates, not checked. Sizes are GB
(1e9 bytes). FLOPs: matmuls and attention, DiT and VAE counted by torch's FlopCounterMode on the meta
device, the LLM as 2 x parameters x tokens + attention; a backward costs 2 forwards when weights train,
1 when only adapters do, and a recomputed block one more forward. The step time is FLOPs / (GPUs x MFU x
peak), an estimate: autoregressive caption sampling reaches far less than the MFU of a training matmul.
"""
import importlib
import math
import os
import sys
from dataclasses import dataclass, field

import torch

from configurator import above, at_least, configure, must

config = dict(
    n_gpus=8,  # GPUs (torchrun ranks; eval runs in one process on one of them)
    gpu_gb=80.0,  # memory per GPU in GB (1e9 bytes)
    peak_tflops=989.0,  # dense bf16 TFLOP/s per GPU (H100 SXM datasheet)
    mfu=0.35,  # model FLOPs utilisation assumed for the step-time estimate
    stages="pretrain_decoder,cold_start,grpo_encoder,grpo_decoder,eval",  # which stages to plan
    overrides="",  # extra key=value settings for every planned stage's config, space separated (e.g. micro_batch=1)
    prompt_tokens=32,  # text tokens of the caption prompt around the image (chat template + instruction; estimate)
    bench_images=100,  # eval: images of the bench, for the whole-run time
)
STAGES = ("pretrain_decoder", "cold_start", "grpo_encoder", "grpo_decoder", "eval")
rules = dict(  # valid values beyond the types (configurator), checked before any model is built
    n_gpus=at_least(1),
    gpu_gb=above(0.0),
    peak_tflops=above(0.0),
    mfu=must(lambda v, c: 0 < v <= 1, "in (0, 1]"),
    stages=must(lambda v, c: v and set(v.split(",")) <= set(STAGES), "a comma-separated subset of " + ", ".join(STAGES)),
    overrides=must(lambda v, c: all("=" in o for o in v.split()), "key=value settings separated by spaces"),
    prompt_tokens=at_least(0),
    bench_images=at_least(1),
)

# ---------------------------------------------------------------------------- the real models' configs
# Qwen2.5-VL-3B-Instruct: config.json of huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct (transformers 5 names)
QWEN25_VL_3B = dict(
    text_config=dict(vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                     num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     hidden_act="silu", rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                                                         "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_act="silu", hidden_size=1280, intermediate_size=3420, num_heads=16, in_chans=3,
                       out_hidden_size=2048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2),
    tie_word_embeddings=True, image_token_id=151655, video_token_id=151656, vision_start_token_id=151652,
    vision_end_token_id=151653)
# SD3.5-Large: transformer/config.json and vae/config.json of huggingface.co/stabilityai/stable-diffusion-3.5-large
SD35_LARGE_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=38,
                              attention_head_dim=64, num_attention_heads=38, joint_attention_dim=4096,
                              caption_projection_dim=2432, pooled_projection_dim=2048, pos_embed_max_size=192,
                              qk_norm="rms_norm")
SD35_LARGE_VAE = dict(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=[128, 256, 512, 512],
                      down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                      layers_per_block=2, norm_num_groups=32, sample_size=1024, scaling_factor=1.5305,
                      shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True)
# CLIP ViT-L/14 (the reward and the clip judge): config.json of huggingface.co/openai/clip-vit-large-patch14
CLIP_VIT_L14 = dict(
    text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                     num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu"),
    vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="quick_gelu"),
    projection_dim=768)
PROJECTOR_HIDDEN = 8192  # model.UAE.from_pretrained: Linear(h, 8192) -> GELU -> Linear(8192, 4096) (DESIGN §3)
MAX_TEXT_TOKENS = 512  # model.UAE.from_pretrained's text window, kept in every later checkpoint's model.json
GB = 1e9
BF16 = 2  # bytes of an activation in the scripts' autocast dtype


def build_models(qwen=QWEN25_VL_3B, transformer=SD35_LARGE_TRANSFORMER, vae=SD35_LARGE_VAE, clip=CLIP_VIT_L14,
                 device="meta") -> dict:
    """The four networks from config dicts, on `device` (meta: shapes only, no memory, no weights)."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel
    from transformers import CLIPConfig, CLIPModel, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    with torch.device(device):
        return {"llm": Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**qwen)),
                "transformer": SD3Transformer2DModel(**transformer), "vae": AutoencoderKL(**vae),
                "clip": CLIPModel(CLIPConfig(**clip)) if clip else None}


def count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def weight_bytes(module, itemsize: int) -> int:
    """Bytes of a module's parameters and floating buffers (SD3's positional table, RoPE's frequencies...)
    after module.to(dtype) with a dtype of `itemsize` bytes."""
    buffers = sum(b.numel() for b in module.buffers() if b.is_floating_point())
    return (count(module) + buffers) * itemsize


def lora_params(module, targets: list[str], r: int) -> int:
    """Parameters of the adapters lora.inject_lora would add: r x (in + out) per targeted nn.Linear."""
    return sum(r * (m.in_features + m.out_features) for name, m in module.named_modules()
               if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in targets))


# ---------------------------------------------------------------------------- activations (the model)

@dataclass
class Rules:
    """What autocast does to the saved tensors. CUDA runs layer_norm and group_norm in fp32 (their input is
    cast to an fp32 copy, their output is fp32, and a modulated fp32 output is cast to bf16 again by each
    linear that reads it); the CPU runs them in bf16, which is how the tests measure."""
    norm_fp32: bool = True

    @property
    def norm(self) -> int:  # bytes per element of a norm's saved input / output
        return 4 if self.norm_fp32 else BF16


def dit_block_saved(d: int, heads: int, mlp: int, s_img: int, s_txt: int, mode: str, lora_r: int = 0,
                    input_grad: bool = True, last: bool = False, rules: Rules = Rules()) -> float:
    """Bytes one SD3 joint block (diffusers JointTransformerBlock) saves for the backward, per sample.
    mode "full": every weight trains (pretrain_decoder, cold_start); "lora": only adapters on the attention
    projections (grpo_decoder), so frozen linears keep their weights, not their inputs. Per stream of s
    tokens (image, text), in bytes per token, a = 2 (bf16), n = the norm's bytes (Rules):
      norm1 (AdaLayerNormZero): input n d (when it needs a gradient) + mean/rstd 2n; its output n d for the
        gradient of the modulation scale (full); the modulated input of q, k, v in bf16: one copy shared
        (CPU), one per linear (CUDA: the fp32 output is cast by each) in full; each adapter its own copy + A x
      q and k: the projection a d, its fp32 upcast 4 d and 1/rms 4 h (RMSNorm), the normalised a d when the
        norm's weight trains; joint attention: q, k, v, output 4 a d, logsumexp 4 h (flash: no L^2 term)
      to_out: its input a d (full: the contiguous slice of the image stream; adapters: each a copy + A x);
        its output a d for the gate's gradient (full)
      norm2: input n d, stats 2n, output n d (full), modulated a d (n d copy on CUDA) for fc1 (full)
      MLP (GELU tanh, width mlp d): fc1 output a mlp d; GELU output a mlp d (full); fc2 output a d (full)
    The last block's text stream stops after q, k, v (context_pre_only)."""
    a, n, full = BF16, rules.norm, mode == "full"
    mod = a * (3 if rules.norm_fp32 else 1)  # bytes of the saved bf16 copies of norm1's modulated output (full)
    lora = 3 * a * (d + lora_r) if mode == "lora" else 0  # q, k, v adapters: their own x copy and A x

    def stream(s, pre_only):
        norm1 = (n * d + 2 * n if input_grad else 0) + (n * d + mod * d if full else 0) + lora
        qk = 2 * (a * d + 4 * d + 4 * heads + (a * d if full else 0))
        if pre_only:
            return s * (norm1 + qk)
        out = (a * d if full else 0) + (a * d if full else 0) + (a * (d + lora_r) if mode == "lora" else 0)
        norm2 = n * d + 2 * n + (n * d + (n if rules.norm_fp32 else a) * d if full else 0)
        ff = a * mlp * d + (a * mlp * d + a * d if full else 0)
        return s * (norm1 + qk + out + norm2 + ff)

    s = s_img + s_txt
    attention = s * (4 * a * d + 4 * heads)
    text_slice_copy = -s_txt * a * d if full and not last else 0  # the text stream reads its slice as a view
    return stream(s_img, False) + stream(s_txt, last) + attention + text_slice_copy


def dit_activations(tcfg: dict, batch: int, s_img: int, s_txt: int, mode: str = "full", checkpointing: bool = False,
                    lora_r: int = 0, projector_hidden: int = 0, llm_hidden: int = 0, rules: Rules = Rules(),
                    steps: int = 1, held_grads: float = 0) -> float:
    """Peak activation bytes of one DiT training forward + backward on `batch` samples: what the blocks save
    (or, with activation checkpointing, each block's two input streams plus one recomputed block at a time)
    plus the backward's working set, the gradients of a block's output and input streams (2 a d per token:
    the backward frees each block's saved tensors as it goes, measured in test_smoke.py -k plan).
    Outside the blocks (full mode): the projector (its input, GELU input and output per text token), the
    context embedder's input and the output norm and projection of the image stream. `steps` DiT forwards
    backpropagated together (cold_start's differentiable sampler: each step's saved tensors, or with
    checkpointing its blocks' inputs, live until the one backward; the recomputed block, the working set and
    the projector, run once before the sampler, are counted once). With steps > 1 a weight used at every step
    has its gradient summed in the backward's buffer from the last step's backward to the first's:
    `held_grads` bytes (the trained DiT's gradient in the compute dtype, unsharded), beside the first steps'
    activations once the last step's are freed; the peak is the larger of that moment and the backward's
    start (measured: without it, 2 checkpointed steps came out 40% low)."""
    d, heads = tcfg["num_attention_heads"] * tcfg["attention_head_dim"], tcfg["num_attention_heads"]
    layers, a, n = tcfg["num_layers"], BF16, rules.norm
    kw = dict(d=d, heads=heads, mlp=4, s_img=s_img, s_txt=s_txt, mode=mode, lora_r=lora_r, rules=rules)
    first, middle = dit_block_saved(input_grad=mode == "full", **kw), dit_block_saved(**kw)
    blocks = [first] + [middle] * (layers - 2) + [dit_block_saved(last=True, **kw)]
    outside = s_img * (n * d + 2 * n)  # norm_out's input
    projector = 0
    if mode == "full":
        outside += s_img * (n * d + a * d) + s_txt * (a * tcfg["joint_attention_dim"])
        projector = s_txt * a * (llm_hidden + 2 * projector_hidden)
    working = 2 * a * d * (s_img + s_txt)
    if checkpointing:  # kept: each block's inputs (both streams); the backward recomputes one block at a time
        kept, once = layers * a * d * (s_img + s_txt) + outside, projector + middle + working
    else:
        kept, once = sum(blocks) + outside, projector + working
    start = batch * (steps * kept + once)
    return max(start, held_grads + batch * ((steps - 1) * kept + once)) if steps > 1 else start


def llm_layer_saved(d: int, f: int, heads: int, r: int, input_grad: bool = True) -> float:
    """Bytes per token one Qwen2 decoder layer saves for the backward with frozen bf16 weights and fp32 LoRA
    adapters (lora.LoRALinear, r) on q, k, v, o, gate, up, down (the encoder's LoRA stages):
      each adapter: its bf16 copy of its input (autocast's cast of x.float()) and A x, a (in + r)
      RMSNorm (Qwen's, fp32 by hand): the fp32 input 4 d and 1/rms 4, twice (the first only when the
        layer's input needs a gradient: not in layer 0, whose input is the frozen embedding)
      attention: q after RoPE and k, v repeated to every head (repeat_kv): 3 a d, output a d, logsumexp 4 h
      SwiGLU: gate output, its SiLU and up output, 3 a f (plus down's adapter copy of its f-wide input)"""
    a = BF16
    adapters = a * (3 * d + d + 2 * d + f) + 7 * a * r
    norms = (4 * d + 4) * (2 if input_grad else 1)
    return adapters + norms + 4 * a * d + 4 * heads + 3 * a * f


def llm_activations(qcfg: dict, batch: int, tokens: int, lora_r: int, logits_tokens: int = 0,
                    checkpointing: bool = False) -> float:
    """Peak activation bytes of one LoRA forward + backward of the text model on `batch` sequences of
    `tokens`, plus (logits_tokens > 0) the teacher-forced log-probs of model.caption_logprobs: log_softmax
    keeps its fp32 output (4 V per kept token) and its computation holds the bf16 logits, their fp32 copy
    and the copy divided by the temperature at once, 10 bytes x V (the working set). Per sequence: the
    RoPE cos/sin (a x head_dim each) and the additive mask (a x tokens^2, one for all layers); the final
    RMSNorm's fp32 input; the backward's working set, the gradients of a layer's output and input (2 a d
    per token). With activation checkpointing (captioner.checkpoint_llm_layers) the layers keep only their
    inputs (a d per token each, bf16) and the backward recomputes one layer at a time (its saved tensors)."""
    t = qcfg["text_config"]
    d, f, heads, layers = t["hidden_size"], t["intermediate_size"], t["num_attention_heads"], t["num_hidden_layers"]
    layer, first = llm_layer_saved(d, f, heads, lora_r), llm_layer_saved(d, f, heads, lora_r, input_grad=False)
    kept = layers * BF16 * d + layer if checkpointing else first + (layers - 1) * layer
    per_token = kept + (4 * d + 4) + 2 * BF16 * d // heads
    saved = batch * (tokens * per_token + BF16 * tokens ** 2)
    logits = batch * logits_tokens * t["vocab_size"] * 10
    return saved + batch * tokens * 2 * BF16 * d + logits


def dit_inference_peak(tcfg: dict, batch: int, s_img: int, s_txt: int) -> float:
    """Estimate (not checked): a no-grad DiT forward holds, besides both streams' hidden states, one block's
    widest moment: the MLP's fc1 output and its GELU (2 x 4 d) beside the input, normed and modulated
    tensors (fp32 on CUDA) of the wider stream, ~14 a d per token."""
    d = tcfg["num_attention_heads"] * tcfg["attention_head_dim"]
    return batch * (s_img + s_txt) * BF16 * d * 14


def vae_decode_peak(vcfg: dict, batch: int, size: int, grad: bool = False, checkpointing: bool = False) -> float:
    """Estimate (not checked): an AutoencoderKL decode at size x size. No grad: the widest full-resolution
    moment, the first resnet of the last up block reading c = block_out_channels[1] channels: its input (a c),
    the fp32 GroupNorm output and SiLU (4 c each, CUDA autocast) and the conv's bf16 input (a c), ~12 c bytes
    per pixel. With grad (cold_start): each resnet saves its input, both GroupNorms' fp32 in/out, both SiLU
    inputs and both convs' inputs, ~22 c bytes per pixel of its resolution, summed over the up path's
    resnets (3 per resolution) and upsamplers. With checkpointing (diffusers' Decoder: the mid block and
    each up block recomputed in the backward): every block's input (a c per pixel of its resolution) plus
    the largest block's saved tensors, recomputed one block at a time."""
    ch = vcfg["block_out_channels"]
    if not grad:
        return batch * size * size * 12 * ch[1]
    blocks, inputs, frac = [], 0.0, 1.0
    for c in ch:  # up path: ch[0] at full size, ch[1] at half, ...
        blocks.append((vcfg["layers_per_block"] + 1) * 22 * c * frac + BF16 * c)
        inputs += BF16 * c * frac
        frac /= 4
    return batch * size * size * ((max(blocks) + inputs) if checkpointing else sum(blocks))


def clip_vision_activations(ccfg: dict, batch: int) -> float:
    """Estimate (not checked): a pre-LN ViT layer with frozen weights saves its two LayerNorms' fp32 input
    and output, q, k, v and the attention output (4 a d), the MLP's input, fc1 output and activation
    (a (d + 2 f)), per token; the image is resized to image_size (reward.py)."""
    v = ccfg["vision_config"]
    d, f = v["hidden_size"], v["intermediate_size"]
    tokens = (v["image_size"] // v["patch_size"]) ** 2 + 1
    return batch * tokens * v["num_hidden_layers"] * (16 * d + BF16 * (4 * d + d + 2 * f))


# ---------------------------------------------------------------------------- FLOPs

def dit_forward_flops(transformer, batch: int, latent: int, s_txt: int) -> float:
    """One DiT forward on `batch` samples, counted by FlopCounterMode on the meta device (matmuls, attention)."""
    from torch.utils.flop_counter import FlopCounterMode
    c = transformer.config
    with torch.device(transformer.device), torch.no_grad(), FlopCounterMode(display=False) as counter:
        empty = lambda *shape: torch.empty(*shape, dtype=transformer.dtype)
        transformer(hidden_states=empty(1, c.in_channels, latent, latent), encoder_hidden_states=empty(1, s_txt, c.joint_attention_dim),
                    pooled_projections=empty(1, c.pooled_projection_dim), timestep=torch.empty(1))
    return batch * counter.get_total_flops()


def vae_flops(vae, batch: int, size: int, decode: bool = True) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    with torch.device(vae.device), torch.no_grad(), FlopCounterMode(display=False) as counter:
        if decode:
            vae.decode(torch.empty(1, vae.config.latent_channels, size // down, size // down, dtype=vae.dtype))
        else:
            vae.encode(torch.empty(1, 3, size, size, dtype=vae.dtype))
    return batch * counter.get_total_flops()


def llm_forward_flops(llm, batch: int, tokens: int, logits: int = 0, image_patches: int = 0) -> float:
    """2 x parameters x tokens for the text model's linears (embeddings are lookups), causal attention
    2 x tokens^2 x d per layer, the LM head for `logits` tokens, and the vision tower on image_patches
    (windows of (window_size / patch)^2 patches, full attention in fullatt_block_indexes)."""
    t, v = llm.config.text_config, llm.config.vision_config
    text = count(llm.model.language_model) - count(llm.model.language_model.embed_tokens)
    flops = 2 * text * tokens + 2 * tokens ** 2 * t.hidden_size * t.num_hidden_layers
    flops += 2 * t.hidden_size * t.vocab_size * logits
    if image_patches:
        window = (v.window_size // v.patch_size) ** 2
        full = len(v.fullatt_block_indexes)
        flops += 2 * count(llm.model.visual) * image_patches + 4 * v.hidden_size * image_patches * (
            full * image_patches + (v.depth - full) * window)
    return batch * flops


def qwen_image_patches(size: int, qcfg: dict) -> int:
    """Patches of a size x size image after Qwen2-VL's smart_resize (sides rounded to patch x merge)."""
    v = qcfg["vision_config"]
    factor = v["patch_size"] * v["spatial_merge_size"]
    return (round(size / factor) * v["spatial_merge_size"]) ** 2


# ---------------------------------------------------------------------------- the stages

@dataclass
class StagePlan:
    name: str
    mode: str  # "ddp" or "fsdp"
    sharded: bool  # whether the script shards anything in this mode
    weights: float = 0.0  # per-GPU bytes of every weight held (frozen, trained, this rank's shards)
    grads: float = 0.0
    optimizer: float = 0.0
    ema: float = 0.0
    activations: float = 0.0  # one micro-batch's training forward + backward (peak)
    no_grad: float = 0.0  # the largest no-grad pass (estimate): rollouts, sampling, VAE
    fsdp_buffers: float = 0.0  # gathered bf16 weights and unsharded gradients in flight (estimate)
    flops: float = 0.0  # per optimizer step (eval: per batch), all GPUs
    steps: int = 0
    micro_batch: int = 0
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.ema + max(self.activations, self.no_grad) + self.fsdp_buffers


def stage_config(stage: str, overrides: list[str]):
    """The script's config with its config/paper_*.py applied, as `python stage.py config/paper_stage.py` reads it."""
    script = "eval_unified" if stage == "eval" else stage
    here = os.path.dirname(os.path.abspath(__file__))
    keys = importlib.import_module(script).config
    return configure(keys, [os.path.join(here, "config", f"paper_{stage}.py")] +
                     [f"--{o}" for o in overrides if o.split("=")[0] in keys])


def adamw_state(nbytes_params: float) -> float:
    """torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype (the step counts are scalars)."""
    return 2 * nbytes_params


def plan_stage(stage: str, cfg, models: dict, n_gpus: int, fsdp: bool, prompt_tokens: int = 32, bench_images: int = 100,
               projector_hidden: int = PROJECTOR_HIDDEN, text_tokens: int = MAX_TEXT_TOKENS, rules: Rules = Rules()) -> StagePlan:
    """Per-GPU memory and FLOPs of `stage` as its script runs with `cfg` (stage_config) on n_gpus. The
    projector's width and the text window are from_pretrained's; `rules` how autocast saves (CUDA)."""
    llm, dit, vae, clip = models["llm"], models["transformer"], models["vae"], models["clip"]
    qcfg = {"text_config": llm.config.text_config.to_dict(), "vision_config": llm.config.vision_config.to_dict()}
    tcfg = dict(dit.config)
    text = llm.config.text_config
    proj = text.hidden_size * projector_hidden + projector_hidden + projector_hidden * tcfg["joint_attention_dim"] + \
        tcfg["joint_attention_dim"]
    n_llm, n_dit, n_vae, n_clip = count(llm), count(dit), count(vae), count(clip)
    frozen_bytes = lambda itemsize, *modules: sum(weight_bytes(m, itemsize) for m in modules)  # + buffers
    dit_buffers = weight_bytes(dit, 1) - n_dit  # floating buffer elements (the positional table)
    down = 2 ** (len(vae.config.block_out_channels) - 1)
    size = getattr(cfg, "image_size", 0) or tcfg["sample_size"] * down  # 0 (or no key): the decoder's, model.image_size
    latent = size // down
    s_img, s_txt = (latent // tcfg["patch_size"]) ** 2, text_tokens
    patches = qwen_image_patches(size, qcfg)
    caption_tokens = getattr(cfg, "max_new_tokens", 0) or MAX_TEXT_TOKENS
    prompt = patches // 4 + prompt_tokens  # merged image tokens + the text around them
    p = StagePlan(stage, "fsdp" if fsdp else "ddp", False, steps=getattr(cfg, "max_steps", 0))
    ranks = 1 if stage == "eval" else n_gpus
    fwd_dit = lambda b, steps=1: dit_forward_flops(dit, b, latent, s_txt) * steps
    reward = n_clip * 4 if getattr(cfg, "reward_backbone", "") else 0  # reward.py loads hf CLIPModel in fp32

    if stage == "pretrain_decoder":
        wb = getattr(torch, cfg.weights_dtype).itemsize
        local = cfg.batch_size // ranks
        micro = cfg.micro_batch or local
        p.micro_batch = micro
        frozen = frozen_bytes(wb, llm, vae) + dit_buffers * wb  # SD3's text encoders are freed after the pooled embedding
        trained = n_dit + proj  # the DiT in weights_dtype, the projector fp32 (nn.Linear's default)
        if fsdp:  # common.shard: .float() then fully_shard; the EMA is made from the shards
            p.sharded = True
            p.weights, p.grads, p.optimizer, p.ema = frozen + 4 * trained / ranks, 4 * trained / ranks, \
                8 * trained / ranks, 4 * trained / ranks
            block = count(dit.transformer_blocks[0])
            p.fsdp_buffers = BF16 * (n_dit - count(dit.transformer_blocks) + proj) + 2 * BF16 * block + 4 * block
        else:
            tb = n_dit * wb + proj * 4
            p.weights, p.grads, p.optimizer, p.ema = frozen + tb, tb, adamw_state(tb), 4 * trained
        p.activations = dit_activations(tcfg, micro, s_img, s_txt, "full", cfg.grad_checkpointing,
                                        projector_hidden=projector_hidden, llm_hidden=text.hidden_size, rules=rules) + \
            (0 if fsdp or wb == 4 else BF16 * proj)  # autocast's cached bf16 copy of the fp32 projector
        p.no_grad = vae_decode_peak(vae.config, local, size) if not cfg.cache_features else 0  # ~ the encoder's
        p.flops = cfg.batch_size * (fwd_dit(1) * (4 if cfg.grad_checkpointing else 3) / 1 +
                                    llm_forward_flops(llm, 1, s_txt) + vae_flops(vae, 1, size, decode=False))
        p.notes.append("LLM and VAE encode each batch under no_grad (cache_features=False)")

    elif stage == "cold_start":  # frozen LLM and VAE in weights_dtype; LoRA on the text model, projector + DiT trained (fp32)
        wb = getattr(torch, cfg.weights_dtype).itemsize
        local = cfg.batch_size // ranks
        micro = cfg.micro_batch or local
        p.micro_batch = micro
        lora = lora_params(llm.model.language_model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"], cfg.lora_r)
        trained = n_dit + proj
        frozen = frozen_bytes(wb, llm, vae) + dit_buffers * 4 + reward  # UAE.load(decoder_dtype=float32)
        if fsdp:
            p.sharded = True
            p.weights = frozen + 4 * lora + 4 * trained / ranks
            p.grads, p.optimizer = 4 * lora + 4 * trained / ranks, 8 * lora + 8 * trained / ranks
            block = count(dit.transformer_blocks[0])
            p.fsdp_buffers = BF16 * (n_dit - count(dit.transformer_blocks) + proj) + 2 * BF16 * block + 4 * block
        else:
            p.weights, p.grads, p.optimizer = frozen + 4 * (lora + trained), 4 * (lora + trained), 8 * (lora + trained)
        text_linear = count(llm.model.language_model) - count(llm.model.language_model.embed_tokens)
        autocast_copies = (BF16 * text_linear * 3 if wb == 4 else 0) + (0 if fsdp else BF16 * trained)  # estimate: fp32 weights cast per use
        ckpt = cfg.grad_checkpointing  # LLM layers, DiT blocks and VAE decoder blocks recomputed
        caption = llm_activations(qcfg, micro, prompt + caption_tokens, cfg.lora_r, caption_tokens + 1, ckpt)  # log-probs
        anchor = llm_activations(qcfg, micro + 1, s_txt, cfg.lora_r, checkpointing=ckpt)  # its rows of the anchor set ("" with the last)
        reconstruction = (llm_activations(qcfg, micro, s_txt, cfg.lora_r, checkpointing=ckpt) +  # the captions' conditioning
                          dit_activations(tcfg, micro, s_img, s_txt, "full", ckpt,
                                          projector_hidden=projector_hidden, llm_hidden=text.hidden_size, rules=rules,
                                          steps=cfg.sample_steps, held_grads=BF16 * n_dit) +
                          vae_decode_peak(vae.config, micro, size, grad=True, checkpointing=ckpt) +
                          clip_vision_activations(CLIP_VIT_L14, micro))
        terms = (caption, anchor, reconstruction)  # micro_batch > 0: each term backpropagated on its own (backward)
        p.activations = (max(terms) if cfg.micro_batch else sum(terms)) + autocast_copies
        p.no_grad = 0
        p.flops = cfg.batch_size * (llm_forward_flops(llm, 1, prompt + caption_tokens, caption_tokens, patches) +
                                    llm_forward_flops(llm, 1, prompt + caption_tokens, caption_tokens) * 2 +
                                    llm_forward_flops(llm, 2, s_txt) * 3 +
                                    (llm_forward_flops(llm, 1, prompt + caption_tokens) +  # the recomputed LLM layers
                                     llm_forward_flops(llm, 2, s_txt) if ckpt else 0) +
                                    fwd_dit(1, cfg.sample_steps) * (4 if ckpt else 3) +
                                    vae_flops(vae, 1, size) * (3 if ckpt else 2))
        p.notes.append(f"the DiT's {cfg.sample_steps} sampler steps, the VAE decode and CLIP backpropagated together per "
                       f"micro-batch of {micro} image(s)" + (", apart from the caption and anchor terms" if cfg.micro_batch else "") +
                       f", the DiT's gradient held in bf16 across the steps ({BF16 * n_dit / GB:.1f} GB)" +
                       (", LLM layers, DiT blocks and VAE decoder blocks recomputed (grad_checkpointing)"
                        if ckpt else ", every activation kept") +
                       "; VAE, CLIP and autocast-copy terms are estimates; captioning the rank's batch (no grad) not counted")

    elif stage == "grpo_encoder":  # LoRA on the text model; everything else frozen in weights_dtype
        wb = getattr(torch, cfg.weights_dtype).itemsize
        local = cfg.images_per_step // ranks * cfg.group_size
        micro = cfg.micro_batch or local
        p.micro_batch = micro
        lora = lora_params(llm.model.language_model, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"], cfg.lora_r)
        p.weights = frozen_bytes(wb, llm, dit, vae) + 4 * proj + 4 * lora + reward
        p.grads, p.optimizer = 4 * lora, 8 * lora
        ckpt = cfg.grad_checkpointing  # LLM layers recomputed
        p.activations = llm_activations(qcfg, micro + 1, s_txt, cfg.lora_r, checkpointing=ckpt) + \
            llm_activations(qcfg, micro, prompt + caption_tokens, cfg.lora_r, caption_tokens + 1, ckpt)  # anchor rows ("" with the last) + log-probs
        cfg_batch = 2 if cfg.cfg_scale != 1.0 else 1
        p.no_grad = max(dit_inference_peak(tcfg, cfg_batch * micro, s_img, s_txt), vae_decode_peak(vae.config, micro, size))
        p.flops = cfg.images_per_step * cfg.group_size * (
            llm_forward_flops(llm, 1, prompt + caption_tokens, 0, patches) + llm_forward_flops(llm, 1, s_txt) +
            fwd_dit(cfg_batch, cfg.decode_steps) + vae_flops(vae, 1, size) +
            llm_forward_flops(llm, 1, prompt + caption_tokens, caption_tokens) * (1 + 2) +  # reference + policy
            llm_forward_flops(llm, 1, s_txt) * 2 +  # the drift anchor's forward + backward
            (llm_forward_flops(llm, 1, prompt + caption_tokens) + llm_forward_flops(llm, 1, s_txt) if ckpt else 0))  # recomputed layers
        p.notes.append(f"the drift anchor per micro-batch of {micro} caption(s) with its update" +
                       (", LLM layers recomputed (grad_checkpointing)" if ckpt else "") + f"; rollout: the rank's "
                       f"{local} captions sampled at once (KV cache not counted), drawn by the frozen DiT and VAE {micro} "
                       f"at a time")

    elif stage == "grpo_decoder":  # LoRA on the DiT's attention; everything else frozen in weights_dtype
        wb = getattr(torch, cfg.weights_dtype).itemsize
        local = cfg.captions_per_step // ranks * cfg.group_size
        micro = cfg.micro_batch or local
        p.micro_batch = micro
        lora = lora_params(dit, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj",
                                 "to_add_out"], cfg.lora_r)
        p.weights = frozen_bytes(wb, llm, dit, vae) + 4 * proj + 4 * lora + reward
        p.grads, p.optimizer = 4 * lora, 8 * lora
        cfg_batch = 2 if cfg.cfg_scale != 1.0 else 1
        p.activations = dit_activations(tcfg, cfg_batch * micro, s_img, s_txt, "lora", False, cfg.lora_r, rules=rules)
        p.no_grad = max(dit_inference_peak(tcfg, cfg_batch * micro, s_img, s_txt), vae_decode_peak(vae.config, micro, size))
        sde = cfg.train_steps - 1
        chosen = max(1, round(cfg.timestep_fraction * sde))
        p.flops = cfg.captions_per_step * (llm_forward_flops(llm, 1, prompt + caption_tokens, 0, patches) +
                                           llm_forward_flops(llm, 1, s_txt)) + \
            cfg.captions_per_step * cfg.group_size * (fwd_dit(cfg_batch, cfg.train_steps) + vae_flops(vae, 1, size) +
                                                      fwd_dit(cfg_batch, chosen) * (2 + 1))  # policy fwd+bwd, reference
        p.notes.append(f"{micro} of the rank's {local} trajectories per DiT batch (sampling, VAE and update)")

    elif stage == "eval":  # one process; every part in weights_dtype; four judges (fp32, ViT-L each)
        wb = getattr(torch, cfg.weights_dtype).itemsize
        b = cfg.batch_size
        judges = sum(bool(getattr(cfg, k)) for k in ("clip", "longclip", "dinov2", "dinov3"))
        vision_l = count(clip.vision_model) + count(clip.visual_projection)
        p.weights = frozen_bytes(wb, llm, dit, vae) + 4 * proj + 4 * (n_clip + (judges - 1) * vision_l)
        cfg_batch = 2 if cfg.cfg_scale != 1.0 else 1
        p.micro_batch = b
        p.no_grad = max(dit_inference_peak(tcfg, cfg_batch * b, s_img, s_txt), vae_decode_peak(vae.config, b, size))
        p.flops = b * (llm_forward_flops(llm, 1, prompt + caption_tokens, 0, patches) + llm_forward_flops(llm, 1, s_txt) +
                       fwd_dit(cfg_batch, cfg.sample_steps) + vae_flops(vae, 1, size))
        p.steps = math.ceil(bench_images / b)
        p.notes.append("one process; judges' weights counted as ViT-L/14 towers (CLIP whole), fp32")
    return p


def step_seconds(p: StagePlan, n_gpus: int, mfu: float, peak_tflops: float) -> float:
    ranks = 1 if p.name == "eval" else n_gpus
    return p.flops / (ranks * mfu * peak_tflops * 1e12)


def table(plans: list[StagePlan], cfg) -> str:
    """Markdown rows, one per stage and mode."""
    head = ("| stage | mode | micro-batch | weights | grads | AdamW | EMA | activations | no-grad peak (est.) | "
            "FSDP buffers (est.) | total GB | fits in " + f"{cfg.gpu_gb:g} GB | PFLOP/step | s/step | run h |")
    rows = [head, "|" + "---|" * (head.count("|") - 1)]
    for p in plans:
        sec = step_seconds(p, cfg.n_gpus, cfg.mfu, cfg.peak_tflops)
        mode = "1 process" if p.name == "eval" else p.mode
        rows.append(f"| {p.name} | {mode} | {p.micro_batch} | " + " | ".join(
            f"{v / GB:.1f}" for v in (p.weights, p.grads, p.optimizer, p.ema, p.activations, p.no_grad, p.fsdp_buffers,
                                      p.total)) +
            f" | {'fits' if p.total <= cfg.gpu_gb * GB else 'does not fit'} | {p.flops / 1e15:.2f} | {sec:.1f} | "
            f"{sec * p.steps / 3600:.1f} |")
    return "\n".join(rows)


def main(argv=None):
    cfg = configure(config, argv, rules)
    models = build_models()
    print(f"parameters (meta device): Qwen2.5-VL-3B {count(models['llm']) / 1e9:.3f}B "
          f"(text {count(models['llm'].model.language_model) / 1e9:.3f}B, vision {count(models['llm'].model.visual) / 1e9:.3f}B), "
          f"SD3.5-Large DiT {count(models['transformer']) / 1e9:.3f}B, VAE {count(models['vae']) / 1e6:.1f}M, "
          f"CLIP ViT-L/14 {count(models['clip']) / 1e6:.0f}M")
    print(f"{cfg.n_gpus} x {cfg.gpu_gb:g} GB, {cfg.peak_tflops:g} TFLOP/s bf16 peak, step times at MFU {cfg.mfu:g} (estimates)")
    plans = []
    overrides = cfg.overrides.split()
    for stage in cfg.stages.split(","):
        stage_cfg = stage_config(stage, overrides)
        for fsdp in (False, True):
            if fsdp and not hasattr(stage_cfg, "fsdp"):
                continue  # the script shards nothing: its FSDP row is its DDP row
            plans.append(plan_stage(stage, stage_cfg, models, cfg.n_gpus, fsdp, cfg.prompt_tokens, cfg.bench_images))
    print(table(plans, cfg))
    for p in plans:
        if p.mode == "ddp":
            print(f"{p.name}: " + "; ".join(p.notes))
    return plans


if __name__ == "__main__":
    main(sys.argv[1:])
