"""The UMM-2 auto-encoder (issue 25): one autoregressive network that both describes and draws (Janus-Pro).

    encoder  image --vision encoder + aligner--> LLM --lm_head--> caption                    (understanding, I2T)
    decoder  caption --the same LLM, user turn + <begin_of_image>--> generation_head --> VQ tokens --VQ decoder--> image
                                                                                             (generation, T2I)

The paper's second architecture (seeds/003; Janus-Pro + Unified-GRPO: GenEval 80.0 -> 84.3): a single
autoregressive model does I2T and T2I in one token space, so the encoder and the decoder are the same
network and RL on either direction moves the weights of both. transformers' JanusForConditionalGeneration
is the network; this module adds what GRPO needs and transformers does not give (its image generate runs
under no_grad and keeps only the last step's scores): our own sampling loops that record every token's
log-prob, captions and image tokens alike, image tokens with classifier-free guidance, and teacher-forced
passes that return the same log-probs. Janus's guidance: logits = u + s (c - u), c from the prompt, u from
the same prompt with every token but bos and <begin_of_image> replaced by pad; tokens ~ softmax(logits / T).

Exactness. A KV-cached step and a teacher-forced forward of the whole sequence add the same numbers in a
different order (log-probs 3e-4 apart in bf16), so log-probs recorded while sampling would not be the ones
GRPO's ratio recomputes. Here a sampled token is defined by
the teacher-forced distribution: token t = argmax(log p_t + g_t), p_t teacher-forced given the tokens < t
and g_t Gumbel noise fixed up front as a function of (row seed, t, token) (the Gumbel-max trick draws
exactly from p_t). The cached loop only drafts the tokens with the same noise; one teacher-forced pass
checks every position, and a row whose draft differs somewhere takes the checked token at its first
difference and is drafted again from there (settle). The tokens are then exactly those of the sequential
sampler of the teacher-forced distribution, and their log-probs are the teacher-forced pass's: the ratio is
exactly 1 on-policy in any dtype, as long as the update runs the same rows in the same layout (dtype,
attention kernel, micro-batch). A draft differs only where two candidates' noisy scores are closer than
the numerical error (0.09% of tokens at bf16, CFG 5), so the first check usually passes (`rounds`).

Both scales: `UMM2.build_tiny(...)` (shapes world), `UMM2.from_pretrained(janus_dir)` (a Janus-Pro directory
in the transformers layout), `UMM2.save` / `UMM2.load` (our checkpoints, checkpoint_parts.py's layout).
"""
import inspect
import json
import os
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from captioner import LLM_LORA_TARGETS, PAPER_CAPTION_PROMPT, Captioner, Captions
from checkpoint_parts import merge_adapters, read_parts, save_parts
from common import micro_slices, SOURCE_REMEDY, check_files, reading
from lora import inject_lora, lora_disabled, lora_layers

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]  # the LLM's attention projections


@dataclass
class ImageRollout:
    """G sampled images per caption as VQ tokens, caption-major (rows of one caption are consecutive)."""
    prompt: dict  # input_ids / attention_mask of the N = B*G rows' T2I prompts (left-padded, ending in <begin_of_image>)
    tokens: torch.Tensor  # (N, M) VQ codebook indices in raster order
    log_probs: torch.Tensor | None  # (N, M) fp32 log-probs of the guided distribution each token was drawn from (None: an unchecked draft)
    texts: list[str]  # the caption of each row
    rounds: int = 0  # teacher-forced checks the draw took (1: the cached draft was right everywhere)

    def rows(self, part: slice) -> "ImageRollout":
        """Rows `part` (a micro-batch) with their prompts."""
        return ImageRollout({k: v[part] for k, v in self.prompt.items()}, self.tokens[part],
                            None if self.log_probs is None else self.log_probs[part], self.texts[part], self.rounds)


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons' 32-bit integer hash) on int64 tensors of values in [0, 2^32); each product is
    split in 16-bit halves so that no int64 overflows."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
        x = x ^ (x >> shift)
        x = ((x & 0xFFFF) * mult + ((((x >> 16) * mult) & 0xFFFF) << 16)) & 0xFFFFFFFF
    return x ^ (x >> 16)


def noise_keys(rows: int, length: int, generator=None, device=None) -> torch.Tensor:
    """(rows, length) int64 keys of the sampling noise: a random seed per row, hashed with each position."""
    seeds = torch.randint(0, 2 ** 32, (rows, 1), generator=generator, device=device)
    return mix32((seeds + torch.arange(length, device=device) * 0x9E3779B9) & 0xFFFFFFFF)


def gumbel_max(log_probs: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """argmax(log p + g), g ~ Gumbel(0, 1) per token: a draw from p (the Gumbel-max trick). g is a function
    of the key and the token alone (counter-based: never stored), so the cached draft and the teacher-forced
    check of one position perturb the same candidates by the same amounts."""
    x = mix32(keys.unsqueeze(-1) ^ torch.arange(log_probs.shape[-1], device=keys.device))
    uniform = ((x >> 8).float() + 0.5) / 2 ** 24  # 24 bits: exact in fp32, never 0 or 1
    return (log_probs - torch.log(-torch.log(uniform))).argmax(-1)


def settle(draft, distribution, choose, valid, max_rounds: int, pad: int = 0):
    """Tokens the teacher-forced pass samples itself, with its log-probs (see the module docstring).

    draft(rows, given, start) -> tokens of the rows (a bool mask; None: all) from the cached loop, row r
    copying given[r, :start[r]] (given None: nothing); distribution(tokens) -> (N, L, V) teacher-forced
    log-probs of every position, always of all N rows (the layout the update will run); choose(log_probs) ->
    (N, L) the token the sampler takes from each (gumbel_max with the row's keys, or argmax); valid(tokens)
    -> (N, L) the positions the policy chose (up to eos). Rows of different lengths are right-padded with
    `pad`. Returns tokens, their log-probs (0 where not valid) and the number of teacher-forced passes.
    Within one layout every round fixes at least the first wrong position of every wrong row, so the loop
    ends; max_rounds guards against a forward whose position t depended on later tokens."""
    tokens = draft(None, None, None)
    for rounds in range(1, max_rounds + 1):
        log_probs = distribution(tokens)
        target, is_valid = choose(log_probs), valid(tokens).bool()
        wrong = (target != tokens) & is_valid
        if not wrong.any():
            chosen = log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            return tokens, torch.where(is_valid, chosen, 0.0), rounds
        rows = wrong.any(1)
        first = wrong.int().argmax(1)[rows]  # each wrong row's first wrong position
        fixed = tokens[rows]
        fixed[torch.arange(len(fixed)), first] = target[rows, first]
        redrafted = draft(rows, fixed, first + 1)  # only the wrong rows: the others are settled
        width = max(tokens.shape[1], redrafted.shape[1])
        tokens = F.pad(tokens, (0, width - tokens.shape[1]), value=pad)
        tokens[rows] = F.pad(redrafted, (0, width - redrafted.shape[1]), value=pad)
    raise RuntimeError(f"sampling did not settle in {max_rounds} teacher-forced passes: the teacher-forced "
                       f"log-probs of a position depend on later tokens (a non-causal attention kernel or mask?)")


def build_processor(tokenizer, image_size: int, patch_size: int):
    """A JanusProcessor for tokenizer (a Janus-style one: shapes.build_tokenizer("janus")): images resized to
    image_size and normalised to [-1, 1] as Janus-Pro's are; one placeholder per vision patch."""
    from transformers import JanusImageProcessor, JanusProcessor
    images = JanusImageProcessor(size={"height": image_size, "width": image_size}, image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)
    return JanusProcessor(image_processor=images, tokenizer=tokenizer, chat_template=tokenizer.chat_template,
                          num_image_tokens=(image_size // patch_size) ** 2)


def _cache_keyword() -> str:
    """transformers 5.24 renamed the decoder's past_key_values argument to cache (the old name warns there)."""
    from transformers import LlamaModel
    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class UMM2(Captioner, nn.Module):
    """Janus (vision encoder + aligner, LLaMA LLM, VQ tokenizer, generation embeddings / aligner / head) as the
    project's second auto-encoder. `llm` is the whole JanusForConditionalGeneration: the one network."""

    PARTS = ("llm", "processor")
    DECODER_LORA = ("llm", LLM_LORA_TARGETS)  # decoder RL adapts the one LLM, as encoder RL does (every linear of it)

    def __init__(self, llm, processor, caption_prompt: str, max_caption_tokens: int, sources: dict | None = None):
        super().__init__()
        self.llm, self.processor, self.tokenizer = llm, processor, processor.tokenizer
        self.caption_prompt, self.max_caption_tokens = caption_prompt, max_caption_tokens
        self.sources = dict(sources or {})  # part -> directory it was loaded from (unchanged parts are referenced, not re-saved)
        self.lora = {}  # part -> {"r", "alpha"} of the adapters injected into llm
        self.adapters = {}  # part -> saved adapter directories merged into it on loading (model.json "adapters")
        self.turns_cut = 0  # UAE's count of captions cut to the decoder's text window: T2I here reads a caption whole
        self.unknown_word_captions = 0  # captions drawn (generate) with words the tokenizer maps to [UNK], as UAE's
        # a caption may not contain image or chat-control tokens (as UAE's); eos stays allowed
        self.banned_token_ids = sorted(set(self.tokenizer.all_special_ids) - {self.tokenizer.eos_token_id})
        self.boi_token_id = self.tokenizer.convert_tokens_to_ids(self.tokenizer.boi_token)
        self.cache_keyword = _cache_keyword()
        llm.model.vqmodel.requires_grad_(False)  # Janus's VQ tokenizer is frozen in every stage

    @property
    def device(self):
        return self.llm.device

    @property
    def image_tokens(self) -> int:
        """M, the VQ tokens of one image: its num_patches x num_patches grid in raster order."""
        return self.llm.config.vq_config.num_patches ** 2

    @property
    def image_size(self) -> int:
        """Side of the images the VQ decoder draws: the token grid times the VQ's downsampling."""
        vq = self.llm.config.vq_config
        return vq.num_patches * vq_factor(vq)

    # ------------------------------------------------------------------ construction

    @classmethod
    def build_tiny(cls, processor, vq=None, llm_hidden=128, llm_layers=3, llm_heads=4, llm_kv_heads=2,
                   vision_hidden=64, vision_layers=2, max_caption_tokens=64, caption_prompt="describe this image in detail.",
                   **vq_sizes):
        """The shapes-world model: the real Janus classes at a few million parameters. `vq` is its image tokenizer
        (pretrain_vq.py's, weights copied in; None: a fresh build_vq(**vq_sizes)), drawing processor-sized images.
        The vision encoder reads them in patches of the VQ's downsampling factor: JanusConfig ties its patch grid
        to the VQ's token grid."""
        from transformers import JanusConfig, JanusForConditionalGeneration
        tok = processor.tokenizer
        size = processor.image_processor.size["height"]
        vq = build_vq(size, **vq_sizes) if vq is None else vq
        if vq.config.num_patches * vq_factor(vq.config) != size:
            raise ValueError(f"the VQ tokenizer draws {vq.config.num_patches * vq_factor(vq.config)}-px images, "
                             f"the processor reads {size}-px ones")
        patch = vq_factor(vq.config)
        config = JanusConfig(
            text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=llm_hidden,
                             intermediate_size=3 * llm_hidden, num_hidden_layers=llm_layers,
                             num_attention_heads=llm_heads, num_key_value_heads=llm_kv_heads,
                             max_position_embeddings=1024, bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
            vision_config=dict(hidden_size=vision_hidden, num_hidden_layers=vision_layers,
                               num_attention_heads=max(1, vision_hidden // 32), image_size=size, patch_size=patch,
                               mlp_ratio=2.0, projection_dim=llm_hidden, num_image_tokens=(size // patch) ** 2),
            vq_config=vq.config.to_dict() | dict(projection_dim=llm_hidden, image_token_embed_dim=llm_hidden),
            image_token_id=tok.convert_tokens_to_ids(tok.image_token))
        llm = JanusForConditionalGeneration(config)
        llm.model.vqmodel.load_state_dict(vq.state_dict())
        return cls(llm, processor, caption_prompt, max_caption_tokens)

    @classmethod
    def from_pretrained(cls, janus_dir: str, dtype=torch.bfloat16, caption_prompt=PAPER_CAPTION_PROMPT,
                        max_caption_tokens=512):
        """Paper scale: a Janus-Pro directory in the transformers layout (model and processor in one folder)."""
        from transformers import AutoProcessor, JanusForConditionalGeneration
        if not os.path.isdir(janus_dir):
            raise FileNotFoundError(f"no such checkpoint directory: {janus_dir}")
        llm = JanusForConditionalGeneration.from_pretrained(janus_dir, dtype=dtype)
        processor = AutoProcessor.from_pretrained(janus_dir)
        return cls(llm, processor, caption_prompt, max_caption_tokens, {"llm": janus_dir, "processor": janus_dir})

    # ------------------------------------------------------------------ our checkpoints

    def save(self, directory: str, trained=PARTS):
        """The `trained` parts in their standard layouts (a LoRA stage: its adapter alone), the others
        referenced, and model.json (checkpoint_parts.save_parts: relocatable; write it inside common.atomic_dir)."""
        parts, adapters = save_parts(self, directory, trained)
        with open(os.path.join(directory, "model.json"), "w") as f:
            json.dump({"architecture": "UMM2", "parts": parts, "adapters": adapters,
                       "caption_prompt": self.caption_prompt, "max_caption_tokens": self.max_caption_tokens}, f, indent=1)

    @classmethod
    def load(cls, directory: str, dtype=torch.float32, remedy: str = SOURCE_REMEDY):
        """A checkpoint written by save(); adapters arrive merged into the LLM. A damaged file is an error
        naming it with `remedy` (a resumed run's own checkpoint: common.RESUME_REMEDY), as UAE.load."""
        from transformers import AutoProcessor, JanusForConditionalGeneration
        meta, paths = read_parts(directory, "UMM2", cls.PARTS, remedy, ("caption_prompt", "max_caption_tokens"))
        with reading(paths["llm"], remedy):  # what check_files cannot see (a config that does not fit its weights)
            llm = JanusForConditionalGeneration.from_pretrained(paths["llm"], dtype=dtype)
        with reading(paths["processor"], remedy):
            processor = AutoProcessor.from_pretrained(paths["processor"])
        model = cls(llm, processor, meta["caption_prompt"], meta["max_caption_tokens"], paths)
        merge_adapters(model, meta, directory)
        return model

    def add_lora(self, part: str, r: int, alpha: float, targets: list[str] = LORA_TARGETS) -> list[nn.Parameter]:
        """Inject adapters into the LLM (the one network: both directions move); returns the trainable parameters."""
        if part != "llm":
            raise ValueError(f"UMM2 has one network to adapt, 'llm'; got part={part!r}")
        module = self.llm.model.language_model
        inject_lora(module, targets, r, alpha)
        self.lora[part] = {"r": r, "alpha": alpha}
        return [p for m in lora_layers(module).values() for p in (m.lora_A, m.lora_B)]

    # ------------------------------------------------------------------ the shared LLM

    def _forward(self, embeds: torch.Tensor, mask: torch.Tensor, cache=None) -> torch.Tensor:
        """The LLM's last-layer states for input embeddings (R, T, h); mask (R, past + T) also covers what the
        cache holds. Positions count unmasked tokens only, so left padding changes no row's numbers' meaning."""
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, -embeds.shape[1]:]
        out = self.llm.model.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                            use_cache=cache is not None, **{self.cache_keyword: cache})
        return out.last_hidden_state

    def _new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.llm.config.text_config)

    def _embed_text(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings; with pixel_values, the image placeholders replaced by the vision encoder +
        aligner's features (understanding)."""
        embeds = self.llm.get_input_embeddings()(input_ids)
        if pixel_values is None:
            return embeds
        features = self.llm.model.get_image_features(pixel_values.to(embeds.dtype)).pooler_output
        is_image = (input_ids == self.llm.config.image_token_id).unsqueeze(-1)
        return embeds.masked_scatter(is_image, features.to(embeds.dtype))

    # ------------------------------------------------------------------ understanding: image -> caption

    def caption_cap(self, max_new_tokens: int = 0) -> int:
        """Caption length to generate: 0 = the checkpoint's max_caption_tokens."""
        return max_new_tokens or self.max_caption_tokens

    def _text_log_probs(self, hidden: torch.Tensor, temperature: float) -> torch.Tensor:
        """log softmax(lm_head / T) over the allowed vocabulary, in fp32."""
        logits = self.llm.lm_head(hidden).float() / temperature
        logits[..., self.banned_token_ids] = -torch.inf
        return logits.log_softmax(-1)

    def _caption_distribution(self, prompt: dict, ids: torch.Tensor, temperature: float) -> torch.Tensor:
        """Teacher-forced (N, L, V) log-probs of every completion position of `ids` after `prompt`."""
        embeds = torch.cat([self._embed_text(prompt["input_ids"], prompt.get("pixel_values")),
                            self._embed_text(ids[:, :-1])], 1)
        mask = torch.cat([prompt["attention_mask"], torch.ones_like(ids[:, :-1])], 1)
        return self._text_log_probs(self._forward(embeds, mask)[:, -ids.shape[1]:], temperature)

    def caption_logprobs(self, prompt: dict, ids: torch.Tensor, temperature: float = 0.7) -> torch.Tensor:
        """Teacher-forced (N, L) fp32 log-probs of completion `ids` after `prompt` (gradients on); those of
        caption()'s tokens equal its recorded log_probs bit for bit where the mask is 1 (same rows, same layout)."""
        return self._caption_distribution(prompt, ids, temperature).gather(-1, ids.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def _draft_caption(self, prompt, keys, temperature, greedy, given=None, start=None) -> torch.Tensor:
        """Cached sampling of captions (settle's draft): gumbel_max with `keys` (N, cap), or argmax; row r
        copies given[r, :start[r]]. Stops when every row has its eos, or at the cap."""
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        mask, cache = prompt["attention_mask"], self._new_cache()
        hidden = self._forward(self._embed_text(prompt["input_ids"], prompt.get("pixel_values")), mask, cache)[:, -1:]
        tokens, done = [], torch.zeros(len(mask), dtype=torch.bool, device=mask.device)
        for t in range(keys.shape[1]):
            log_probs = self._text_log_probs(hidden, temperature)[:, 0]
            token = log_probs.argmax(-1) if greedy else gumbel_max(log_probs, keys[:, t])
            if given is not None and t < given.shape[1]:
                token = torch.where(t < start, given[:, t], token)
            token = torch.where(done, pad, token)
            tokens.append(token)
            done = done | (token == eos)
            if done.all():
                break
            mask = F.pad(mask, (0, 1), value=1)
            hidden = self._forward(self._embed_text(token[:, None]), mask, cache)
        return torch.stack(tokens, 1)

    @torch.no_grad()
    def caption(self, images, num_samples: int = 1, temperature: float = 0.7, max_new_tokens: int = 0,
                greedy: bool = False, prompts: list[str] | None = None, generator=None, check: bool = True) -> Captions:
        """G = num_samples captions per image, at most caption_cap(max_new_tokens) tokens each, sampled from
        softmax(lm_head / T) over the allowed vocabulary (or greedy); `prompts` replaces the caption prompt, one
        per image. check (settle): the tokens are the teacher-forced sampler's and log_probs (N, L) are
        caption_logprobs' numbers (0 after eos); without it, the cached draft alone, no log_probs (evaluation)."""
        prompt = self.caption_inputs(images, num_samples, prompts)
        keys = noise_keys(len(prompt["input_ids"]), self.caption_cap(max_new_tokens), generator, self.device)

        def draft(rows, given, start):
            rows = slice(None) if rows is None else rows
            return self._draft_caption({k: v[rows] for k, v in prompt.items()}, keys[rows], temperature, greedy,
                                       given, start)
        if check:  # a row's caption can change length between checks: a generous bound on the rounds
            choose = (lambda lp: lp.argmax(-1)) if greedy else (lambda lp: gumbel_max(lp, keys[:, :lp.shape[1]]))
            ids, log_probs, _ = settle(draft, lambda ids: self._caption_distribution(prompt, ids, temperature), choose,
                                       self.completion_mask, 2 * keys.shape[1] + 2, self.tokenizer.pad_token_id)
        else:
            ids, log_probs = draft(None, None, None), None
        mask = self.completion_mask(ids)
        texts = self.tokenizer.batch_decode(ids * mask + self.tokenizer.pad_token_id * (1 - mask), skip_special_tokens=True)
        return Captions(prompt, ids, mask, [t.strip() for t in texts], log_probs)

    @torch.no_grad()
    def describe(self, images, temperature: float = 0.7, max_new_tokens: int = 0, greedy: bool = False,
                 batch_size: int = 0, generator=None) -> list[str]:
        """Images -> one caption text each (generate's mirror; unchecked drafts); batch_size images per pass (0 = all)."""
        step = batch_size if batch_size > 0 else max(len(images), 1)
        return [text for i in range(0, len(images), step) for text in
                self.caption(images[i:i + step], 1, temperature, max_new_tokens, greedy, generator=generator, check=False).texts]

    # ------------------------------------------------------------------ generation: caption -> image tokens -> image

    def image_prompt(self, texts: list[str], num_samples: int = 1) -> dict:
        """The T2I prompts: a user turn holding each caption, the assistant's turn opened, then <begin_of_image>
        (the processor's generation_mode="image"); each caption repeated num_samples times, left-padded."""
        turns = [self.processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": t}]}],
                                                    add_generation_prompt=True, tokenize=False)
                 for t in texts for _ in range(num_samples)]
        batch = self.processor(text=turns, generation_mode="image", return_tensors="pt", padding=True, padding_side="left")
        return {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask")}

    def _guided_rows(self, prompt: dict, cfg_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompt rows, followed by their unconditional twins when guiding: Janus replaces every token but
        bos and <begin_of_image> by pad and keeps the mask, so a twin has its row's length and positions."""
        ids, mask = prompt["input_ids"], prompt["attention_mask"]
        if cfg_scale == 1.0:
            return ids, mask
        return torch.cat([ids, self.unconditional(ids)]), torch.cat([mask, mask])

    def unconditional(self, ids: torch.Tensor) -> torch.Tensor:
        """T2I prompt ids with every token but bos and <begin_of_image> replaced by pad: Janus's unconditional
        prompt, which guidance reads and caption dropout trains (pretrain_umm2.py)."""
        keep = ids == self.boi_token_id
        if self.tokenizer.bos_token_id is not None:
            keep |= ids == self.tokenizer.bos_token_id
        return torch.where(keep, ids, self.tokenizer.pad_token_id)

    def _image_log_probs(self, hidden: torch.Tensor, cfg_scale: float, temperature: float) -> torch.Tensor:
        """States of the guided rows (2N, T, h) or N rows -> (N, T, V) fp32 log-probs of the distribution tokens
        are drawn from: Janus's guidance on the generation head's logits, u + s (c - u), then / T."""
        logits = self.llm.model.generation_head(hidden).float()
        if cfg_scale != 1.0:
            cond, uncond = logits.chunk(2)
            logits = uncond + cfg_scale * (cond - uncond)
        return (logits / temperature).log_softmax(-1)

    def _image_distribution(self, prompt: dict, tokens: torch.Tensor, cfg_scale: float, temperature: float):
        """Teacher-forced (N, M, V) guided log-probs of every image-token position of `tokens` after `prompt`."""
        ids, mask = self._guided_rows(prompt, cfg_scale)
        previous = tokens[:, :-1].repeat(len(ids) // len(tokens), 1)  # the twins read the same image tokens
        embeds = torch.cat([self._embed_text(ids), self.llm.prepare_embeddings_for_image_generation(previous)], 1)
        hidden = self._forward(embeds, torch.cat([mask, torch.ones_like(previous)], 1))[:, -tokens.shape[1]:]
        return self._image_log_probs(hidden, cfg_scale, temperature)

    def image_logprobs(self, prompt: dict, tokens: torch.Tensor, cfg_scale: float = 5.0,
                       temperature: float = 1.0) -> torch.Tensor:
        """Teacher-forced (N, M) fp32 log-probs of image `tokens` after `prompt` under the guided distribution
        (gradients on, through both the conditional and the unconditional rows); for draw()'s tokens they equal
        its recorded log_probs bit for bit (same rows, same layout)."""
        log_probs = self._image_distribution(prompt, tokens, cfg_scale, temperature)
        return log_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)

    @torch.no_grad()
    def _draft_images(self, prompt, keys, cfg_scale, temperature, given=None, start=None) -> torch.Tensor:
        """Cached sampling of the M image tokens (settle's draft), guided rows and twins in one batch:
        gumbel_max with `keys` (N, M); row r copies given[r, :start[r]]."""
        ids, mask = self._guided_rows(prompt, cfg_scale)
        cache, twins = self._new_cache(), len(ids) // len(keys)
        hidden = self._forward(self._embed_text(ids), mask, cache)[:, -1:]
        tokens = []
        for t in range(self.image_tokens):
            token = gumbel_max(self._image_log_probs(hidden, cfg_scale, temperature)[:, 0], keys[:, t])
            if given is not None:
                token = torch.where(t < start, given[:, t], token)
            tokens.append(token)
            if t + 1 < self.image_tokens:
                mask = F.pad(mask, (0, 1), value=1)
                embeds = self.llm.prepare_embeddings_for_image_generation(token.repeat(twins)[:, None])
                hidden = self._forward(embeds, mask, cache)
        return torch.stack(tokens, 1)

    @torch.no_grad()
    def draw(self, texts: list[str], num_samples: int = 1, cfg_scale: float = 5.0, temperature: float = 1.0,
             generator=None, check: bool = True) -> ImageRollout:
        """The T2I rollout: num_samples images per caption as VQ tokens, each token drawn from the guided
        distribution softmax((u + s (c - u)) / T) (Janus-Pro's defaults: s = 5, T = 1). check (settle): the
        tokens are the teacher-forced sampler's and log_probs are image_logprobs' numbers; without it, the
        cached draft alone (evaluation)."""
        prompt = self.image_prompt(texts, num_samples)
        keys = noise_keys(len(prompt["input_ids"]), self.image_tokens, generator, self.device)
        row_texts = [t for t in texts for _ in range(num_samples)]

        def draft(rows, given, start):
            rows = slice(None) if rows is None else rows
            return self._draft_images({k: v[rows] for k, v in prompt.items()}, keys[rows], cfg_scale, temperature,
                                      given, start)
        if not check:
            return ImageRollout(prompt, draft(None, None, None), None, row_texts)
        tokens, log_probs, rounds = settle(draft, lambda t: self._image_distribution(prompt, t, cfg_scale, temperature),
                                           lambda lp: gumbel_max(lp, keys), torch.ones_like, self.image_tokens + 1)
        return ImageRollout(prompt, tokens, log_probs, row_texts, rounds)

    def decode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """VQ tokens (B, M) -> images in [0, 1], float (B, 3, H, W), through the VQ decoder."""
        return vq_decode(self.llm.model.vqmodel, tokens)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (or uint8), image_size square -> VQ tokens (B, M) (vq_encode)."""
        return vq_encode(self.llm.model.vqmodel, images)

    @torch.no_grad()
    def generate(self, texts: list[str], cfg_scale: float = 5.0, temperature: float = 1.0, generator=None,
                 batch_size: int = 0, steps: int = 0, allow_cut: bool = False) -> torch.Tensor:
        """Text -> images in [0, 1]: draw (an unchecked draft) and decode; batch_size texts per pass (0 = all).
        Captions with words the tokenizer maps to [UNK] are counted (unknown_word_captions, eval_unified reports
        it). steps and allow_cut are the UAE's (ODE steps; its text window): an autoregressive decoder draws its
        M tokens and reads a caption whole, so they change nothing here; the stages call both models alike."""
        if 0 < batch_size < len(texts):
            return torch.cat([self.generate(texts[i:i + batch_size], cfg_scale, temperature, generator)
                              for i in range(0, len(texts), batch_size)])
        self.unknown_word_captions += sum(bool(words) for words in self.unknown_words(texts))
        return self.decode_tokens(self.draw(texts, 1, cfg_scale, temperature, generator, check=False).tokens)

    def compile_decoder(self) -> "UMM2":
        """torch.compile the frozen VQ decoder (tokens -> pixels); the LLM's cached sampling steps change shape
        every token and stay eager. Checked once on the tiny world: the same images to 2e-6 after ~23 s of compiling
        (1 thread); its speed-up is not measured."""
        self.llm.model.vqmodel.decoder.compile()
        return self

    # ------------------------------------------------------------------ what the RL stages and eval_unified call

    def condition(self, texts: list[str], allow_cut: bool = False) -> torch.Tensor:
        """What the decoder reads of each caption: the LLM's last-layer states over its T2I prompt (image_prompt,
        left-padded; pads exact zeros), (B, T, h). Encoder RL's drift anchor (Captioner.drift) holds them where
        the run started, as UAE.condition's: the adapters live in the LLM that also draws. allow_cut: the UAE's."""
        prompt = self.image_prompt(texts)
        mask = prompt["attention_mask"].bool()
        hidden = self._forward(self._embed_text(prompt["input_ids"]), prompt["attention_mask"])
        return torch.where(mask.unsqueeze(-1), hidden, 0.0)  # where, not *: a pad's state may be NaN

    @property
    def max_text_tokens(self) -> int:
        """The longest T2I prompt the LLM can read with an image's tokens after it (its position table)."""
        return self.llm.config.text_config.max_position_embeddings - self.image_tokens

    def turn_lengths(self, texts: list[str]) -> list[int]:
        """Tokens of each caption's T2I prompt: what must fit max_text_tokens (check_texts)."""
        return self.image_prompt(texts)["attention_mask"].sum(1).tolist()

    @torch.no_grad()
    def redraw(self, texts: list[str], steps: int, cfg_scale: float, micro_batch: int) -> tuple:
        """grpo_encoder's reward renders (call it with the LLM's adapters off: the frozen decoder): the captions
        drawn with guidance (temperature 1), micro_batch texts per pass (0 = all). Returns the images, the drift
        anchor's texts (texts + [""], as the UAE's) and their conditioning. steps: the UAE's."""
        anchor_texts = texts + [""]
        reference = self.condition(anchor_texts)
        return self.generate(texts, cfg_scale, batch_size=micro_batch), anchor_texts, reference

    @torch.no_grad()
    def decoder_rollout(self, texts: list[str], cfg) -> dict:
        """grpo_decoder's rollout: cfg.group_size images per caption (caption-major) as VQ tokens, each drawn from
        the guided distribution (cfg.cfg_scale, cfg.image_temperature) and recorded with its log-prob (draw: the
        teacher-forced sampler), in micro-batches of cfg.micro_batch rows, each drawn as one batch so the update
        can rerun it in the same layout. cfg.shared_noise is refused: the sampling noise is fixed per row, so a
        caption's G images would all be one. The UAE's SDE settings (train_steps, noise_level, sde_steps) do not
        apply."""
        if cfg.shared_noise:
            raise ValueError("shared_noise=True: a UMM2 draws each token with noise fixed by its row's seed, so a "
                             "caption's G images would be identical; use --shared_noise=False")
        rows = [t for t in texts for _ in range(cfg.group_size)]
        chunks = micro_slices(len(rows), cfg.micro_batch)
        draws = [self.draw(rows[c], 1, cfg.cfg_scale, cfg.image_temperature) for c in chunks]
        images = torch.cat([self.decode_tokens(d.tokens) for d in draws])
        return {"images": images, "draws": draws, "chunks": chunks, "cfg_scale": cfg.cfg_scale,
                "temperature": cfg.image_temperature}

    def decoder_units(self, rollout: dict, fraction: float) -> list:
        """One update unit: every image token at once, in one teacher-forced pass (fraction: the UAE's timesteps)."""
        return [None]

    def decoder_logprobs(self, rollout: dict, unit, rows: slice) -> tuple:
        """Image tokens of the rows `rows` (one of the rollout's micro-batches), teacher-forced with gradients in
        the layout they were drawn in (so the ratio is exactly 1 on-policy): (log-probs, recorded log-probs,
        the reference's log-probs with the adapters off, None: grpo.grpo_loss's k3 KL), each (rows, M)."""
        if rows not in rollout["chunks"]:
            raise ValueError(f"rows {rows} were not drawn together (micro-batches {rollout['chunks']}): the update must "
                             f"rerun the draw's layout")
        d = rollout["draws"][rollout["chunks"].index(rows)]
        logp = self.image_logprobs(d.prompt, d.tokens, rollout["cfg_scale"], rollout["temperature"])
        with torch.no_grad(), lora_disabled(self.llm):
            ref = self.image_logprobs(d.prompt, d.tokens, rollout["cfg_scale"], rollout["temperature"])
        return logp, d.log_probs, ref, None

    @torch.no_grad()
    def measure_text_reliance(self, rt, images: torch.Tensor, texts: list[str], generator=None, batch_size: int = 50) -> dict:
        """eval_unified's text reliance, the UAE's measure (model.text_reliance) for an autoregressive decoder: the
        negative log-likelihood of each uint8 image's VQ tokens (B, 3, H, W) given its own caption, divided by that
        given another image's caption (the previous one's, the UAE's pairing), unguided: 1.0 = the decoder ignores
        the text; lower = it reads it. Returns text_reliance (the ratio of the summed NLLs) and per_image (each
        image's own ratio). generator: the UAE's (no noise here)."""
        other = texts[-1:] + texts[:-1]
        own, oth = [], []
        for i in range(0, len(texts), batch_size):
            tokens = self.encode_images(images[i:i + batch_size].to(self.device))
            with rt.autocast():
                for nll, captions in ((own, texts), (oth, other)):
                    nll.append(-self.image_logprobs(self.image_prompt(captions[i:i + batch_size]), tokens, 1.0).sum(1))
        own, oth = torch.cat(own), torch.cat(oth)
        return {"text_reliance": (own.sum() / oth.sum()).item(), "per_image": (own / oth).tolist()}


# ----------------------------------------------------------------------------- the VQ image tokenizer

def vq_factor(config) -> int:
    """Pixels per token side of a JanusVQVAE config: one 2x downsampling between consecutive levels."""
    return 2 ** (len(config.channel_multiplier) - 1)


def build_vq(image_size: int, codebook_size: int = 1024, code_dim: int = 8, channels: int = 32, levels: int = 4,
             res_blocks: int = 0):
    """A fresh Janus VQ tokenizer (JanusVQVAE: LlamaGen's layout) for image_size-px images: `levels`
    resolutions, so one token per 2 ** (levels - 1) px square (shapes world: 48 px, 4 levels, a 6x6 grid;
    pretrain_vq.py), codebook_size codes of code_dim, `channels` wide at every level (GroupNorm of 32 groups: a
    multiple of 32), res_blocks ResNet blocks per encoder level (the decoder has one more)."""
    from transformers import JanusVQVAE, JanusVQVAEConfig
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(f"image_size={image_size} is not a multiple of the VQ's downsampling {factor} (levels={levels})")
    return JanusVQVAE(JanusVQVAEConfig(embed_dim=code_dim, num_embeddings=codebook_size, base_channels=channels,
                                       latent_channels=channels, channel_multiplier=[1] * levels,
                                       num_res_blocks=res_blocks, num_patches=image_size // factor))


def load_vq(directory: str, remedy: str = SOURCE_REMEDY):
    """pretrain_vq.py's tokenizer: <directory>/vq, a JanusVQVAE in the transformers layout; a damaged file is
    an error naming it with `remedy`."""
    from transformers import JanusVQVAE
    path = os.path.join(directory, "vq")
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path}/config.json missing: run pretrain_vq.py --out_dir={directory} first")
    check_files(path, remedy)
    with reading(path, remedy):
        return JanusVQVAE.from_pretrained(path, dtype=torch.float32)


def vq_latents(vq, images: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [-1, 1] -> (B, M, d) encoder outputs on the unit sphere, raster order."""
    z = vq.quant_conv(vq.encoder(images.to(vq.device, vq.dtype)))
    return F.normalize(z.float().flatten(2).transpose(1, 2), dim=-1)


def vq_codebook(vq) -> torch.Tensor:
    """(K, d) codebook on the unit sphere: Janus's VQ (LlamaGen's, codebook_l2_norm) is trained and decodes
    with l2-normalised codes (transformers' encode compares unnormalised vectors instead)."""
    return F.normalize(vq.quantize.embedding.weight.float(), dim=-1)


def vq_pixels(vq, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (or uint8) -> [-1, 1], checked against the tokenizer's size."""
    x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
    size = vq.config.num_patches * vq_factor(vq.config)
    if x.shape[-2:] != (size, size):
        raise ValueError(f"images of {tuple(x.shape[-2:])} pixels; the VQ tokenizer reads {size}x{size}")
    return 2 * x - 1


@torch.no_grad()
def vq_encode(vq, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] (or uint8) -> VQ tokens (B, M): the nearest code on the unit sphere."""
    return (vq_latents(vq, vq_pixels(vq, images)) @ vq_codebook(vq).T).argmax(-1)


def vq_decode(vq, tokens: torch.Tensor) -> torch.Tensor:
    """VQ tokens (B, M) -> images in [0, 1], float (B, 3, H, W) (Janus's decode: normalised codes)."""
    return ((vq.decode(tokens).float() + 1) / 2).clamp(0, 1)


@dataclass
class VQOutput:
    reconstruction: torch.Tensor  # (B, 3, H, W) in [-1, 1] (unclamped), what vq_decode(tokens) draws
    tokens: torch.Tensor  # (B, M) codes chosen
    latents: torch.Tensor  # (B, M, d) the encoder's outputs on the unit sphere (dead-code restarts draw from them)
    codebook_loss: torch.Tensor  # mean |sg(z) - e|^2: moves the codes towards the encoder's outputs
    commitment_loss: torch.Tensor  # mean |z - sg(e)|^2: keeps the encoder near its codes (VQ-VAE's beta term)


def vq_autoencode(vq, images: torch.Tensor) -> VQOutput:
    """The training forward transformers' JanusVQVAE.forward does not give (it decodes from the indices, so
    no gradient reaches the encoder): quantise to the nearest unit-sphere code e and decode the
    straight-through z + sg(e - z), whose value is e and whose gradient reaches z (VQ-VAE, van den Oord et
    al. 2017, eq. 3; LlamaGen's l2-normalised codes). images: (B, 3, H, W) in [0, 1] or uint8."""
    z = vq_latents(vq, vq_pixels(vq, images))
    codes = vq_codebook(vq)
    tokens = (z.detach() @ codes.T).argmax(-1)
    e = codes[tokens]
    straight = z + (e - z).detach()
    side = vq.config.num_patches
    grid = straight.transpose(1, 2).reshape(len(z), -1, side, side).to(vq.dtype)
    return VQOutput(vq.decoder(vq.post_quant_conv(grid)).float(), tokens, z,
                    F.mse_loss(e, z.detach()), F.mse_loss(z, e.detach()))
