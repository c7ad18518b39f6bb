"""The UMM-1 auto-encoder (DESIGN §3) and its samplers.

    encoder  image --Qwen2.5-VL--> caption                         (understanding, I2T)
    decoder  caption --same LLM, role "generate"--> hidden states --projector--> SD3 MM-DiT --VAE--> image
                                                                                       (generation, T2I)

One class serves both scales: `UAE.build_tiny(...)` makes the shapes-world model from configs,
`UAE.from_pretrained(qwen_dir, sd3_dir)` loads Qwen2.5-VL-3B-Instruct + an SD3 pipeline directory
from disk, and `UAE.save` / `UAE.load` handle our own checkpoints (checkpoint_parts.py). What the UAE
shares with the UMM2 on the captioning side (Captioner) is in captioner.py, the GRPO maths in grpo.py,
the runtime and checkpoints every stage shares in common.py, the hand-written LoRA in lora.py.
"""
import json
import os

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from captioner import PAPER_CAPTION_PROMPT, Captioner, Captions
from checkpoint_parts import merge_adapters, read_parts, save_parts
from common import micro_slices, reading, SOURCE_REMEDY
from grpo import sde_step, step_kl
from lora import inject_lora, lora_disabled, lora_layers

# ============================================================================ the auto-encoder

DIT_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]  # joint attention (Flow-GRPO)


def tiny_dit(vae, layers=4, heads=4, head_dim=32, patch=2, joint_dim=128, pooled_dim=32, qk_norm=None):
    """An SD3 MM-DiT sized for the VAE's latent grid (shapes scale)."""
    from diffusers import SD3Transformer2DModel
    latent = vae.config.sample_size // 2 ** (len(vae.config.block_out_channels) - 1)
    if latent % patch:
        raise ValueError(f"dit_patch={patch} must divide the VAE's {latent}x{latent} latent grid")
    return SD3Transformer2DModel(
        sample_size=latent, patch_size=patch, in_channels=vae.config.latent_channels, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim,
        out_channels=vae.config.latent_channels, pos_embed_max_size=latent // patch, qk_norm=qk_norm)


def projector_mlp(llm_hidden: int, hidden: int, joint_dim: int) -> nn.Sequential:
    """DESIGN §3: Linear(h, 8192) -> GELU -> Linear(8192, 4096) into the DiT's encoder_hidden_states."""
    return nn.Sequential(nn.Linear(llm_hidden, hidden), nn.GELU(), nn.Linear(hidden, joint_dim))


def pack_vision_attention(llm) -> None:
    """Make the Qwen2.5-VL vision tower attend over all images of a batch in one call. transformers runs
    its sdpa/eager vision attention once per image (a Python loop over cu_seqlens): at the shapes scale,
    64 images x 3 layers = 192 tiny attention calls per step, and the vision tower took 72% of the
    encoder's forward + backward. When every image has the same number of patches (always, after
    resizing to image_size), the images stack into one batch; otherwise, or under flash attention
    (which packs natively), the library's own forward runs. Same maths: a test checks the outputs."""
    from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as q

    class PackedVisionAttention(q.Qwen2_5_VLVisionAttention):
        def forward(self, hidden_states, cu_seqlens, position_embeddings=None, **kwargs):
            lengths = cu_seqlens[1:] - cu_seqlens[:-1]
            if "flash" in (self.config._attn_implementation or "") or bool(lengths.min() != lengths.max()):
                return super().forward(hidden_states, cu_seqlens, position_embeddings=position_embeddings, **kwargs)
            seq, images = hidden_states.shape[0], len(lengths)
            q_, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
            q_, k = q.apply_rotary_pos_emb_vision(q_, k, *position_embeddings)
            q_, k, v = (t.reshape(images, seq // images, self.num_heads, -1).transpose(1, 2) for t in (q_, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(q_, k, v, scale=self.scaling)
            return self.proj(out.transpose(1, 2).reshape(seq, -1))

    for block in llm.model.visual.blocks:
        if type(block.attn) is q.Qwen2_5_VLVisionAttention:
            block.attn.__class__ = PackedVisionAttention


class UAE(Captioner, nn.Module):
    """LLM (Qwen2.5-VL) + projector + MM-DiT (SD3) + VAE, with the flow-matching scheduler."""

    DECODER_LORA = ("transformer", DIT_LORA_TARGETS)  # decoder RL adapts the DiT (Flow-GRPO); encoder RL the LLM

    def __init__(self, llm, processor, transformer, vae, scheduler, projector_hidden: int, pooled: torch.Tensor,
                 max_text_tokens: int, caption_prompt: str, sources: dict | None = None):
        super().__init__()
        self.llm, self.processor, self.transformer, self.vae, self.scheduler = llm, processor, transformer, vae, scheduler
        self.tokenizer = processor.tokenizer
        pack_vision_attention(llm)
        h, d = llm.config.text_config.hidden_size, transformer.config.joint_attention_dim
        self.projector = projector_mlp(h, projector_hidden, d)
        self.text_positions = None  # optional learned embedding of each text token's index (replace_decoder)
        self.register_buffer("pooled", pooled.reshape(1, -1).float())  # constant pooled_projections
        # DiT latents z = (vae latent - shift) * scale, per channel. SD3 uses one scalar pair (the VAE
        # config's); a VAE trained for exactness has channels of very different mean/std, and a scalar
        # scale leaves some of them at a fraction of the noise's std (low SNR, slow to learn).
        c = vae.config
        self.register_buffer("latent_shift", torch.full((c.latent_channels,), float(c.shift_factor or 0.0)))
        self.register_buffer("latent_scale", torch.full((c.latent_channels,), float(c.scaling_factor)))
        # LLM states -> projector input h' = (h - text_shift) * text_scale, per channel (identity until a
        # decoder is pretrained). Measured on the shapes LLM: one shared direction dominates every token's
        # last-layer state (|mean| 11.4 vs a per-channel std of 0.6; neighbouring tokens at cosine ~0.9),
        # so the caption is a small perturbation; standardising it made the DiT read captions ~2x sooner.
        self.register_buffer("text_shift", torch.zeros(h))
        self.register_buffer("text_scale", torch.ones(h))
        self.max_text_tokens, self.caption_prompt = max_text_tokens, caption_prompt
        self.turns_cut = 0  # the model's own captions cut to the text window so far (text_tokens)
        self.unknown_word_captions = 0  # the model's own captions with words its tokenizer maps to [UNK] (text_tokens)
        self.prediction = "velocity"  # what the DiT outputs: "velocity" (SD3) or "sample" (x0; see velocity())
        self.sources = dict(sources or {})  # part -> directory it was loaded from (unchanged parts are referenced, not re-saved)
        self.lora = {}  # part -> {"r", "alpha"} of the adapters injected into llm / transformer
        self.adapters = {}  # part -> saved adapter directories merged into it on loading (save: model.json "adapters")
        # A caption may not contain image/vision/chat-control tokens (an image pad in a completion would
        # break the teacher-forced forward); eos stays allowed. Applied to sampling and scoring alike.
        self.banned_token_ids = sorted(set(self.tokenizer.all_special_ids) - {self.tokenizer.eos_token_id})
        vae.requires_grad_(False)

    @property
    def device(self):
        return self.pooled.device

    # ------------------------------------------------------------------ construction

    @classmethod
    def build_tiny(cls, processor, vae, llm_hidden=128, llm_layers=3, llm_heads=4, llm_kv_heads=2, vision_hidden=64,
                   vision_layers=2, dit_layers=4, dit_heads=4, dit_head_dim=32, dit_patch=2, joint_dim=128,
                   projector_hidden=512, max_text_tokens=64, caption_prompt="describe this image in detail.", shift=1.0):
        """The shapes-world model: the real Qwen2.5-VL / SD3 classes at a few million parameters."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        tok, ip = processor.tokenizer, processor.image_processor
        ids = tok.convert_tokens_to_ids
        head_dim = llm_hidden // llm_heads
        llm = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=llm_hidden, intermediate_size=3 * llm_hidden,
                             num_hidden_layers=llm_layers, num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads,
                             max_position_embeddings=1024, bos_token_id=None, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.pad_token_id,
                             # M-RoPE splits the rotary half-dim into (time, height, width) sections
                             rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                              "mrope_section": [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]}),
            vision_config=dict(depth=vision_layers, hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                               num_heads=max(1, vision_hidden // 32), patch_size=ip.patch_size,
                               spatial_merge_size=ip.merge_size, temporal_patch_size=ip.temporal_patch_size,
                               out_hidden_size=llm_hidden, window_size=ip.patch_size * ip.merge_size * 4,
                               fullatt_block_indexes=[vision_layers - 1]),
            image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
            vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
            tie_word_embeddings=True))
        transformer = tiny_dit(vae, dit_layers, dit_heads, dit_head_dim, dit_patch, joint_dim)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        # no CLIP text encoders at this scale: the constant pooled projection is zeros
        return cls(llm, processor, transformer, vae, scheduler, projector_hidden, torch.zeros(32),
                   max_text_tokens, caption_prompt)

    def replace_decoder(self, transformer, projector_hidden: int, text_positions: bool = False,
                        prediction: str = "velocity"):
        """A fresh DiT + projector (pretrain_decoder at the shapes scale sizes its own decoder).
        text_positions adds a learned, zero-initialised embedding of each text token's index to the
        projector input: the MM-DiT has no positional encoding on its text stream and relies on the
        LLM's states to carry word order (see condition()). prediction: see velocity()."""
        if prediction not in ("velocity", "sample"):
            raise ValueError(f"prediction must be 'velocity' or 'sample', got {prediction!r}")
        self.prediction = prediction
        self.transformer = transformer.to(self.device)
        h, d = self.llm.config.text_config.hidden_size, transformer.config.joint_attention_dim
        self.projector = projector_mlp(h, projector_hidden, d).to(self.device)
        self.text_positions = None
        if text_positions:
            self.text_positions = nn.Embedding(self.max_text_tokens, h).to(self.device)
            nn.init.zeros_(self.text_positions.weight)
        self.sources.pop("transformer", None)

    @classmethod
    def from_pretrained(cls, qwen_dir: str, sd3_dir: str, dtype=torch.bfloat16, projector_hidden=8192,
                        max_text_tokens=512, caption_prompt=PAPER_CAPTION_PROMPT):
        """Paper scale: Qwen2.5-VL-3B-Instruct and an SD3(.5) diffusers pipeline directory, from disk.
        The pooled projection is SD3's CLIP-L + CLIP-G pooled embedding of the empty string, computed
        once here with the pipeline's text encoders, which are then freed (DESIGN §3)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        for path in (qwen_dir, sd3_dir):
            if not os.path.isdir(path):
                raise FileNotFoundError(f"no such checkpoint directory: {path}")
        llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(qwen_dir, dtype=dtype)
        processor = AutoProcessor.from_pretrained(qwen_dir)
        # accelerate (requirements.txt) loads straight into the weights, never a random 8B init first
        transformer = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer", dtype=dtype)
        vae = AutoencoderKL.from_pretrained(sd3_dir, subfolder="vae", dtype=dtype)
        transformer, vae = (m if m.dtype == dtype else m.to(dtype) for m in (transformer, vae))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_dir, subfolder="scheduler")
        # encode_prompt sizes the (absent) T5 states from the transformer's config: hand it the loaded one
        pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, transformer=transformer, vae=None, text_encoder_3=None,
                                                        tokenizer_3=None, dtype=dtype)
        with torch.no_grad():
            pooled = pipe.encode_prompt("", "", None, do_classifier_free_guidance=False)[2].float()
        del pipe
        sources = {"llm": qwen_dir, "processor": qwen_dir, "transformer": os.path.join(sd3_dir, "transformer"),
                   "vae": os.path.join(sd3_dir, "vae"), "scheduler": os.path.join(sd3_dir, "scheduler")}
        return cls(llm, processor, transformer, vae, scheduler, projector_hidden, pooled[0], max_text_tokens,
                   caption_prompt, sources)

    # ------------------------------------------------------------------ our checkpoints

    PARTS = ("llm", "processor", "transformer", "vae", "scheduler")

    def save(self, directory: str, trained=PARTS):
        """Write the `trained` parts in their standard layouts, the projector and pooled vector as
        safetensors, and model.json naming where every other part lives (save_parts), so a stage re-saves
        only what it changed."""
        parts, adapters = save_parts(self, directory, trained)
        positions = {} if self.text_positions is None else {"text_positions": self.text_positions.state_dict()["weight"]}
        save_file({k: v.detach().float().cpu().contiguous() for k, v in (self.projector.state_dict() | positions).items()} |
                  {k: getattr(self, k).cpu() for k in ("pooled", "latent_shift", "latent_scale", "text_shift", "text_scale")},
                  os.path.join(directory, "projector.safetensors"))
        with open(os.path.join(directory, "model.json"), "w") as f:
            json.dump({"architecture": "UAE", "parts": parts, "adapters": adapters,
                       "projector_hidden": self.projector[0].out_features, "max_text_tokens": self.max_text_tokens,
                       "caption_prompt": self.caption_prompt, "prediction": self.prediction}, f, indent=1)

    @classmethod
    def load(cls, directory: str, dtype=torch.float32, decoder_dtype=None, remedy: str = SOURCE_REMEDY):
        """Load a checkpoint written by save(); adapters arrive merged into their parts. `decoder_dtype`
        (default: dtype) is the DiT's and text positions' (the projector is always fp32): a stage that
        trains the decoder keeps it fp32 while the frozen LLM and VAE come in a half dtype (cold_start).
        A damaged file (cut short, not JSON, a key missing) is an error naming it and saying what to do
        (`remedy`: re-run the stage that wrote it; a resumed run's own checkpoint: common.RESUME_REMEDY)."""
        decoder_dtype = decoder_dtype or dtype
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        meta, paths = read_parts(directory, "UAE", cls.PARTS, remedy, ("projector_hidden", "max_text_tokens", "caption_prompt"))
        with reading(paths["llm"], remedy):  # what check_files cannot see (a config that does not fit its weights)
            llm = Qwen2_5_VLForConditionalGeneration.from_pretrained(paths["llm"], dtype=dtype)
        with reading(paths["processor"], remedy):
            processor = AutoProcessor.from_pretrained(paths["processor"])
        with reading(paths["transformer"], remedy):
            transformer = SD3Transformer2DModel.from_pretrained(paths["transformer"], dtype=decoder_dtype)
        with reading(paths["vae"], remedy):
            vae = AutoencoderKL.from_pretrained(paths["vae"], dtype=dtype)
        with reading(paths["scheduler"], remedy):
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(paths["scheduler"])
        projector_path = os.path.join(directory, "projector.safetensors")
        with reading(projector_path, remedy):
            weights = load_file(projector_path)
            pooled = weights.pop("pooled")
        # latent stats absent (a checkpoint written before they existed): the VAE config's scalar pair
        shift, scale = weights.pop("latent_shift", None), weights.pop("latent_scale", None)
        positions = weights.pop("text_positions", None)
        text_stats = weights.pop("text_shift", None), weights.pop("text_scale", None)  # absent: identity
        # without accelerate, diffusers may keep fp32 weights despite dtype= (DESIGN §10): cast explicitly
        transformer, vae = (m if m.dtype == d else m.to(d) for m, d in ((transformer, decoder_dtype), (vae, dtype)))
        model = cls(llm, processor, transformer, vae, scheduler, meta["projector_hidden"], pooled,
                    meta["max_text_tokens"], meta["caption_prompt"], paths)
        with reading(projector_path, remedy):  # its keys and sizes
            model.projector.load_state_dict(weights)
        merge_adapters(model, meta, directory)
        model.prediction = meta.get("prediction", "velocity")  # checkpoints written before the option: SD3's
        if positions is not None:
            model.text_positions = nn.Embedding.from_pretrained(positions.to(decoder_dtype), freeze=False)
        if text_stats[0] is not None:
            model.text_shift.copy_(text_stats[0])
            model.text_scale.copy_(text_stats[1])
        if shift is not None:
            model.latent_shift.copy_(shift)
            model.latent_scale.copy_(scale)
        return model

    def add_lora(self, part: str, r: int, alpha: float, targets: list[str]) -> list[nn.Parameter]:
        """Inject adapters into the LLM's text model or the DiT; returns the trainable parameters."""
        module = self.llm.model.language_model if part == "llm" else self.transformer
        inject_lora(module, targets, r, alpha)
        self.lora[part] = {"r": r, "alpha": alpha}
        return [p for m in lora_layers(module).values() for p in (m.lora_A, m.lora_B)]

    # ------------------------------------------------------------------ understanding: image -> caption

    def caption_cap(self, max_new_tokens: int = 0) -> int:
        """Caption length to generate: 0 = the decoder's window, max_text_tokens minus the generate-turn
        prefix and its closing <|im_end|>, so that any caption the encoder writes, even one stopped by
        the cap, fits the decoder's window whole (text_hidden_states refuses what does not). Longer caps
        are refused: text past the window never reaches the decoder, so the reconstruction reward cannot
        see it (measured: grpo_encoder with a 64-token cap on a 40-token window learned to ramble past the
        window, caption precision 0.75). A caption stopped by the cap is counted (captions_cut)."""
        window = self.max_text_tokens - self.generate_prefix_tokens() - 1
        if max_new_tokens > window:
            raise ValueError(f"max_new_tokens={max_new_tokens} exceeds the {window} caption tokens the decoder reads "
                             f"(max_text_tokens={self.max_text_tokens} in the checkpoint's model.json, minus the "
                             f"generate-turn prefix and closing token); use 0 for the full window")
        return max_new_tokens or window

    def sampling_options(self, temperature: float = 0.7, max_new_tokens: int = 0, greedy: bool = False) -> dict:
        """llm.generate's settings for captions, every sampling knob explicit. generate's own arguments
        outrank the checkpoint's generation_config (Qwen2.5-VL-Instruct's sets top_k 1, top_p 0.001 and
        repetition_penalty 1.05), so tokens come from plain softmax(logits / T) over the allowed
        vocabulary: the distribution that caption_logprobs scores and GRPO's ratio assumes."""
        return dict(do_sample=not greedy, temperature=None if greedy else temperature, top_k=None, top_p=None,
                    repetition_penalty=1.0, max_new_tokens=self.caption_cap(max_new_tokens),
                    pad_token_id=self.tokenizer.pad_token_id, eos_token_id=self.tokenizer.eos_token_id,
                    suppress_tokens=self.banned_token_ids)

    @torch.no_grad()
    def caption(self, images, num_samples: int = 1, temperature: float = 0.7, max_new_tokens: int = 0,
                greedy: bool = False, prompts: list[str] | None = None) -> Captions:
        """G = num_samples captions per image from one batched generate, at most caption_cap(max_new_tokens)
        tokens each (sampling_options); `prompts` replaces the caption prompt, one per image."""
        prompt = self.caption_inputs(images, num_samples, prompts)
        out = self.llm.generate(**prompt, **self.sampling_options(temperature, max_new_tokens, greedy),
                                return_dict_in_generate=True)
        ids = out.sequences[:, prompt["input_ids"].shape[1]:]
        mask = self.completion_mask(ids)
        texts = self.tokenizer.batch_decode(ids * mask + self.tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
        return Captions(prompt, ids, mask, [t.strip() for t in texts])

    @torch.no_grad()
    def describe(self, images, temperature: float = 0.7, max_new_tokens: int = 0, greedy: bool = False,
                 batch_size: int = 0) -> list[str]:
        """Images -> one caption text each (generate's mirror); batch_size images per pass (0 = all)."""
        step = batch_size if batch_size > 0 else max(len(images), 1)
        return [text for i in range(0, len(images), step)
                for text in self.caption(images[i:i + step], 1, temperature, max_new_tokens, greedy).texts]

    def caption_logprobs(self, prompt: dict, ids: torch.Tensor, temperature: float = 0.7):
        """Teacher-forced (N, L) fp32 log-probs of completion `ids` after `prompt` (gradients on)."""
        n_new = ids.shape[1]
        inputs = dict(prompt, input_ids=torch.cat([prompt["input_ids"], ids], 1),
                      attention_mask=torch.cat([prompt["attention_mask"], torch.ones_like(ids)], 1))
        if "mm_token_type_ids" in prompt:
            inputs["mm_token_type_ids"] = torch.cat([prompt["mm_token_type_ids"], torch.zeros_like(ids)], 1)
        out = self.llm(**inputs, logits_to_keep=n_new + 1, use_cache=False)  # one pass: a KV cache would only take memory
        return self.token_logprobs(out.logits[:, :-1], ids, temperature)

    def token_logprobs(self, logits, ids, temperature: float) -> torch.Tensor:
        """log softmax(logits / T) at the chosen ids, in fp32, over the allowed vocabulary."""
        logits = logits.float() / temperature
        logits[..., self.banned_token_ids] = -torch.inf
        return logits.log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    # ------------------------------------------------------------------ generation: caption -> image

    def generate_turns(self, texts: list[str]) -> list[str]:
        return [self.tokenizer.apply_chat_template([{"role": "generate", "content": t}], tokenize=False) for t in texts]

    def turn_lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each caption's generate-role turn: what must fit max_text_tokens."""
        return [len(ids) for ids in self.tokenizer(self.generate_turns(texts))["input_ids"]]

    def text_tokens(self, texts: list[str], allow_cut: bool = False) -> dict:
        """The generate-role chat turns holding the captions, right-padded to max_text_tokens (fixed, like
        SD3's T5 sequence, so a caption's conditioning never depends on what else is in the batch). A turn
        longer than the window is an error, never cut silently: the decoder could not read its tail.
        allow_cut (for the model's own captions, which caption_cap keeps inside the window but whose text a
        BPE tokenizer may re-encode a token or two longer): cut them to the window and count them in
        self.turns_cut, which eval_unified reports. A word the tokenizer does not know is an error too, never
        a silent [UNK]; in the model's own captions (allow_cut) it is counted in self.unknown_word_captions."""
        enc = self.tokenizer(self.generate_turns(texts))
        unk = self.tokenizer.unk_token_id
        suspects = [i for i, ids in enumerate(enc["input_ids"]) if unk in ids] if unk is not None else []
        unknown = {i: w for i, w in zip(suspects, self.unknown_words([texts[i] for i in suspects])) if w}
        if unknown and not allow_cut:
            i = next(iter(unknown))
            raise ValueError(f"{len(unknown)} of {len(texts)} captions have words the tokenizer does not know (e.g. "
                             f"{', '.join(map(repr, unknown[i]))} in {texts[i][:80]!r}): the decoder would read them as "
                             f"{self.tokenizer.unk_token}. Known words: {self.known_words()}")
        self.unknown_word_captions += len(unknown)  # the model's own captions: counted, reported by eval_unified
        lengths = [len(ids) for ids in enc["input_ids"]]
        over = [i for i, n in enumerate(lengths) if n > self.max_text_tokens]
        if over and not allow_cut:
            raise ValueError(f"{len(over)} of {len(texts)} captions exceed the decoder's window of max_text_tokens="
                             f"{self.max_text_tokens} (e.g. {lengths[over[0]]} tokens, {texts[over[0]][:80]!r}...): "
                             f"shorten them or use a decoder trained with a longer window")
        self.turns_cut += len(over)
        for key in enc:
            enc[key] = [row[:self.max_text_tokens] for row in enc[key]]
        enc = self.tokenizer.pad(enc, padding="max_length", max_length=self.max_text_tokens, return_tensors="pt",
                                 padding_side="right")
        return enc.to(self.device)

    def text_hidden_states(self, texts: list[str], allow_cut: bool = False) -> torch.Tensor:
        """Last-layer LLM hidden states of every token of each caption's generate-role turn (text_tokens),
        the pads set to exact zeros. The caption's text is the decoder's only input: inference, cold start
        and RL all condition this way. A right pad's state is not empty (its query attends to the caption
        before it), so unzeroed the DiT reads up to 50 noisy summaries of the caption beside its tokens:
        on complete captions it learned more slowly (GenEval-shapes 0.060 against 0.110 zeroed at
        2,000 steps; RESULTS.md)."""
        enc = self.text_tokens(texts, allow_cut)
        hidden = self.llm.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                use_cache=False).last_hidden_state  # one pass: a KV cache would only take memory
        return hidden * enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # pads: exact zeros (project)

    def condition(self, texts: list[str], allow_cut: bool = False) -> torch.Tensor:
        """Caption -> DiT encoder_hidden_states (B, max_text_tokens, joint_attention_dim)."""
        return self.project(self.text_hidden_states(texts, allow_cut))

    def decoder_modules(self) -> list[nn.Module]:
        """What the decoder trains on top of the frozen LLM: text positions (if any), projector, DiT."""
        return [m for m in (self.text_positions, self.projector, self.transformer) if m is not None]

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """LLM hidden states (B, T, h) of generate-role turns -> DiT encoder_hidden_states (B, T, joint_attention_dim).
        Caption tokens are standardised (text_shift / text_scale); pads, exact zeros (text_hidden_states),
        stay zero, so the projector sees only their position."""
        if not torch.is_autocast_enabled(hidden.device.type):  # an fp32 run fed states stored in bf16 (pretrain_decoder's cache)
            hidden = hidden.to(self.projector[0].weight.dtype)
        is_text = caption_tokens(hidden).unsqueeze(-1)
        hidden = torch.where(is_text, (hidden - self.text_shift.to(hidden.dtype)) * self.text_scale.to(hidden.dtype), 0)
        if self.text_positions is not None:  # called, not indexed: a sharded table (FSDP) gathers in its forward
            if hidden.shape[1] > self.text_positions.num_embeddings:
                raise ValueError(f"{hidden.shape[1]} text tokens exceed the decoder's {self.text_positions.num_embeddings} "
                                 f"text positions (max_text_tokens)")
            hidden = hidden + self.text_positions(torch.arange(hidden.shape[1], device=hidden.device)).to(hidden.dtype)
        return self.projector(hidden)

    def generate_prefix_tokens(self) -> int:
        """How many tokens precede the caption in a generate-role turn (<|im_start|>generate ...)."""
        tok = self.tokenizer
        empty = tok(tok.apply_chat_template([{"role": "generate", "content": ""}], tokenize=False))["input_ids"]
        return len(empty) - len(tok(tok.eos_token + "\n")["input_ids"])

    def velocity(self, latents, sigma, cond):
        """Rectified-flow velocity v = eps - x0 at noise level sigma (SD3 timestep = 1000 sigma).

        With prediction "sample" the DiT outputs the clean latent x0_hat and v = (x_t - x0_hat) / sigma
        (x-prediction, Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"): a
        velocity-predicting DiT must copy the input noise through its width, which a token carrying as
        many latent values as it has channels cannot do (measured on the shapes world: x0 error at
        sigma 0.95 above the data variance even with a perfect per-cell condition). sigma is clamped at
        0.05 as there; the loss and every sampler see only v, so nothing else changes."""
        sigma = sigma.expand(latents.shape[0]) if sigma.dim() == 0 else sigma
        out = self.transformer(hidden_states=latents, encoder_hidden_states=cond,
                               pooled_projections=self.pooled.expand(latents.shape[0], -1).to(cond.dtype),
                               timestep=sigma * 1000).sample
        if self.prediction == "velocity":
            return out
        return (latents - out) / sigma.clamp(min=0.05).view(-1, *([1] * (latents.dim() - 1))).to(out.dtype)

    def guided_velocity(self, latents, sigma, cond, negative, cfg_scale: float):
        """Classifier-free guidance: v_neg + s (v_cond - v_neg), one batched forward."""
        if cfg_scale == 1.0:
            return self.velocity(latents, sigma, cond)
        v_cond, v_neg = self.velocity(torch.cat([latents, latents]), sigma, torch.cat([cond, negative])).chunk(2)
        return v_neg + cfg_scale * (v_cond - v_neg)

    def sigmas(self, steps: int) -> torch.Tensor:
        """The scheduler's sigma schedule (with its shift), steps + 1 values from ~1 down to 0."""
        self.scheduler.set_timesteps(steps)
        return self.scheduler.sigmas.float().to(self.device)

    def latent_shape(self, n: int) -> tuple:
        c = self.transformer.config
        return (n, c.in_channels, c.sample_size, c.sample_size)

    def negative_condition(self, n: int, negative_prompt: str = "") -> torch.Tensor:
        return self.condition([negative_prompt]).expand(n, -1, -1)

    def sample_ode(self, cond, steps: int = 20, cfg_scale: float = 1.0, negative=None, generator=None, noise=None):
        """Euler ODE sampler of the rectified flow: x <- x + (sigma' - sigma) v. Returns latents."""
        x = noise if noise is not None else torch.randn(self.latent_shape(cond.shape[0]), generator=generator,
                                                        device=self.device)
        sigmas = self.sigmas(steps)
        for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
            v = self.guided_velocity(x.to(cond.dtype), sigma, cond, negative, cfg_scale).float()
            x = x.float() + (sigma_next - sigma) * v
        return x

    def sde_transition(self, x, sigma, sigma_next, cond, negative, cfg_scale: float, noise_level: float, sigma_max,
                       prev_sample=None, generator=None):
        """One Flow-GRPO step from x at sigma: (x', log-prob, mean, step std). Sampling and the GRPO
        update both call this, so the ratio is exactly 1 on-policy (same layout, same dtype)."""
        v = self.guided_velocity(x.to(cond.dtype), sigma, cond, negative, cfg_scale).float()
        return sde_step(x, v, sigma, sigma_next, noise_level, sigma_max, prev_sample, generator)

    def sample_sde(self, cond, steps: int = 10, cfg_scale: float = 1.0, negative=None, noise_level: float = 0.7,
                   generator=None, sde_steps: int = 0, noise=None):
        """Flow-GRPO sampler: the first `sde_steps` steps (0 = all but the last) are SDE steps that record
        their Gaussian log-prob and mean; the rest are plain Euler ODE steps, neither noisy nor trained
        (the last step, sigma -> 0, always). `noise` is the starting latent (default: fresh N(0, I)).
        Returns a dict with latents (B, steps+1, ...), log_probs (B, n_sde), means (B, n_sde, ...) and
        sigmas, where n_sde = min(sde_steps or steps-1, steps-1)."""
        n_sde = min(sde_steps or steps - 1, steps - 1)
        x = noise if noise is not None else torch.randn(self.latent_shape(cond.shape[0]), generator=generator,
                                                        device=self.device)
        sigmas = self.sigmas(steps)
        latents, log_probs, means = [x], [], []
        for i in range(steps):
            level = noise_level if i < n_sde else 0.0
            x, log_prob, mean, _ = self.sde_transition(x, sigmas[i], sigmas[i + 1], cond, negative, cfg_scale, level,
                                                       sigmas[1], generator=generator)
            if i < n_sde:
                log_probs.append(log_prob)
                means.append(mean)
            latents.append(x)
        return {"latents": torch.stack(latents, 1), "log_probs": torch.stack(log_probs, 1),
                "means": torch.stack(means, 1), "sigmas": sigmas}

    def encode_images(self, images: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """Images in [0, 1] (or uint8) -> DiT latents z = (vae latent - shift) * scale (SD3 convention)."""
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        dist_ = self.vae.encode((2 * x - 1).to(self.device, self.vae.dtype)).latent_dist
        z = dist_.sample(generator) if sample else dist_.mode()
        return (z.float() - self.latent_shift.view(1, -1, 1, 1)) * self.latent_scale.view(1, -1, 1, 1)

    @property
    def image_size(self) -> int:
        """Side of the images the decoder draws: the DiT's latent size times the VAE's downsampling."""
        return self.transformer.config.sample_size * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def check_image_size(self, height: int, width: int):
        """Images the decoder trains on (pretrain_decoder) must suit it: their VAE latents must cut into whole DiT
        patches, no more a side than the DiT's position table holds. (Source images of any size are fine
        elsewhere: the encoder's processor and the reward resize them.)"""
        c = self.transformer.config
        factor = 2 ** (len(self.vae.config.block_out_channels) - 1) * c.patch_size
        most = (c.pos_embed_max_size or c.sample_size // c.patch_size) * factor
        if height % factor or width % factor or max(height, width) > most:
            raise ValueError(f"{height}x{width} images: the decoder trains on sides that are multiples of {factor} px "
                             f"(VAE downsampling x DiT patch) up to {most} px (its position table); set image_size "
                             f"to one of those (0 = as stored)")

    def compile_decoder(self) -> "UAE":
        """torch.compile the DiT for sampling; its shapes are fixed (text window, latent size, batch), so it
        compiles once per batch size. Measured on one CPU thread, 32 images x 10 CFG steps: 0.86 -> 0.56 s,
        after ~25 s of compiling."""
        self.transformer.compile()
        return self

    def decode_latents(self, z: torch.Tensor) -> torch.Tensor:
        """DiT latents -> images in [0, 1], float (B, 3, H, W)."""
        z = z.float() / self.latent_scale.view(1, -1, 1, 1) + self.latent_shift.view(1, -1, 1, 1)
        x = self.vae.decode(z.to(self.vae.dtype)).sample
        return ((x.float() + 1) / 2).clamp(0, 1)

    @torch.no_grad()
    def generate(self, texts: list[str], steps: int = 20, cfg_scale: float = 1.0, negative_prompt: str = "",
                 generator=None, batch_size: int = 0, allow_cut: bool = False) -> torch.Tensor:
        """Text -> images in [0, 1]: condition, Euler ODE, VAE decode; batch_size texts per pass (0 = all).
        allow_cut: the texts are the model's own captions (text_tokens)."""
        if 0 < batch_size < len(texts):
            return torch.cat([self.generate(texts[i:i + batch_size], steps, cfg_scale, negative_prompt, generator,
                                            allow_cut=allow_cut) for i in range(0, len(texts), batch_size)])
        cond = self.condition(texts, allow_cut)
        negative = self.negative_condition(len(texts), negative_prompt) if cfg_scale != 1.0 else None
        return self.decode_latents(self.sample_ode(cond, steps, cfg_scale, negative, generator))

    # ------------------------------------------------------------------ what the RL stages and eval_unified call

    @torch.no_grad()
    def redraw(self, texts: list[str], steps: int, cfg_scale: float, micro_batch: int) -> tuple:
        """grpo_encoder's reward renders (call it with the LLM's adapters off: the frozen decoder): the captions
        conditioned in one pass with the "" of the CFG negative, drawn by the Euler ODE in micro-batches of
        micro_batch (0 = all) from noise drawn whole, so micro-batches change no image. Returns the images, the
        drift anchor's texts (texts + [""]) and their conditioning (the anchor's frozen reference)."""
        anchor_texts = texts + [""]
        reference = self.condition(anchor_texts, allow_cut=True)
        cond = reference[:-1]
        negative = reference[-1:].expand(len(cond), -1, -1) if cfg_scale != 1.0 else None
        noise = torch.randn(self.latent_shape(len(cond)), device=self.device)
        images = torch.cat([self.decode_latents(self.sample_ode(cond[c], steps, cfg_scale, None if negative is None else negative[c],
                                                                noise=noise[c]))
                            for c in micro_slices(len(cond), micro_batch)])
        return images, anchor_texts, reference

    @torch.no_grad()
    def decoder_rollout(self, texts: list[str], cfg) -> dict:
        """grpo_decoder's rollout (Flow-GRPO): cfg.group_size images per caption (caption-major) drawn by the SDE
        sampler (cfg.train_steps steps, the first cfg.sde_steps stochastic; cfg.noise_level, cfg.cfg_scale), in
        micro-batches of cfg.micro_batch trajectories; cfg.shared_noise: a caption's G images start from one
        latent, so their rewards differ only through the SDE steps' noise, which is what the log-probs credit
        (DanceGRPO's use_same_noise). Returns images, the trajectories with their step log-probs, and what
        decoder_logprobs needs to recompute them."""
        cond = self.condition(texts, allow_cut=True).repeat_interleave(cfg.group_size, 0)
        negative = self.negative_condition(len(cond)) if cfg.cfg_scale != 1.0 else None
        noise = (torch.randn(self.latent_shape(len(texts)), device=self.device).repeat_interleave(cfg.group_size, 0)
                 if cfg.shared_noise else None)
        chunks = micro_slices(len(cond), cfg.micro_batch)
        parts = [self.sample_sde(cond[c], cfg.train_steps, cfg.cfg_scale, None if negative is None else negative[c],
                                 cfg.noise_level, sde_steps=cfg.sde_steps, noise=None if noise is None else noise[c])
                 for c in chunks]
        traj = {k: torch.cat([p[k] for p in parts]) for k in ("latents", "log_probs", "means")} | {"sigmas": parts[0]["sigmas"]}
        images = torch.cat([self.decode_latents(traj["latents"][c, -1]) for c in chunks])
        return {"images": images, "traj": traj, "cond": cond, "negative": negative, "chunks": chunks,
                "cfg_scale": cfg.cfg_scale, "noise_level": cfg.noise_level}

    def decoder_units(self, rollout: dict, fraction: float) -> list:
        """The SDE timesteps one update trains: a random `fraction` of them (at least one)."""
        n_sde = rollout["traj"]["log_probs"].shape[1]
        return torch.randperm(n_sde)[:max(1, round(fraction * n_sde))].tolist()

    def decoder_logprobs(self, rollout: dict, j: int, rows: slice) -> tuple:
        """Timestep j of trajectories `rows`, recomputed with gradients in the sampler's layout (so the ratio is
        exactly 1 on-policy): (log-prob, recorded log-prob, None, KL on the step means against the reference,
        the DiT's adapters off: step_kl), each (rows, 1) for grpo.grpo_loss."""
        traj, cond, negative = rollout["traj"], rollout["cond"], rollout["negative"]
        sigmas = traj["sigmas"]
        x, x_next = traj["latents"][rows, j], traj["latents"][rows, j + 1]
        neg = None if negative is None else negative[rows]
        step = lambda: self.sde_transition(x, sigmas[j], sigmas[j + 1], cond[rows], neg, rollout["cfg_scale"],
                                           rollout["noise_level"], sigmas[1], prev_sample=x_next)
        _, logp, mean, step_std = step()
        with torch.no_grad(), lora_disabled(self.transformer):
            _, _, ref_mean, _ = step()
        return logp[:, None], traj["log_probs"][rows, j][:, None], None, step_kl(mean, ref_mean, step_std)[:, None]

    @torch.no_grad()
    def measure_text_reliance(self, rt, images: torch.Tensor, texts: list[str], generator, batch_size: int = 50) -> dict:
        """text_reliance (below) of uint8 `images` (B, 3, H, W) and their captions, batch_size per pass."""
        with rt.autocast():
            latents = torch.cat([self.encode_images(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])
            hidden = torch.cat([self.text_hidden_states(texts[i:i + batch_size]) for i in range(0, len(texts), batch_size)])
        return text_reliance(self, rt, latents, hidden, generator, batch_size=batch_size)


def caption_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """(..., T) bool: which rows of LLM text states are caption tokens. Pads are exact zeros
    (UAE.text_hidden_states), which a real hidden state never is."""
    return hidden.abs().amax(-1) > 0


@torch.no_grad()
def text_reliance(model, rt, latents, hidden, generator, sigma=0.9, batch_size=50) -> dict:
    """x0 error when denoising from sigma with each image's own caption, divided by the error with
    another image's caption (the previous one's: roll(1)): 1.0 = the decoder ignores the text; lower = it reads it.
    At high noise the caption is the only source of the layout, so this shows text use long before
    samples do. `hidden` are text_hidden_states. Returns text_reliance (the ratio of the summed errors)
    and per_image (each image's own ratio, for paired tests)."""
    noise = torch.randn(latents.shape, generator=generator, device=rt.device)
    x_t = (1 - sigma) * latents + sigma * noise
    other = hidden.roll(1, 0)
    own_err, other_err = [], []
    for i in range(0, len(latents), batch_size):  # batched: at 1024 px all latents do not fit one forward
        x, x0 = x_t[i:i + batch_size].repeat(2, 1, 1, 1), latents[i:i + batch_size].repeat(2, 1, 1, 1)
        with rt.autocast():  # own and other caption in one forward: the CFG batch shape (compile_decoder)
            v = model.velocity(x, torch.tensor(sigma, device=rt.device),
                               model.project(torch.cat([hidden[i:i + batch_size], other[i:i + batch_size]])))
        err = ((x - sigma * v.float() - x0) ** 2).flatten(1).sum(1).chunk(2)
        own_err.append(err[0])
        other_err.append(err[1])
    own, oth = torch.cat(own_err), torch.cat(other_err)
    return {"text_reliance": (own.sum() / oth.sum()).item(), "per_image": (own / oth).tolist()}
