"""The captioning side both auto-encoders share (the UAE in model.py, the UMM2 in umm2.py): image -> caption.

Captioner is the base class of both with what does not depend on the architecture: the caption prompt's
processor inputs, the completion mask, the count of captions the length cap stopped, the checks of texts
against the tokenizer and the decoder's window, and encoder RL's drift anchor on the decoder's reading of
captions (condition_drift; anchor_slices cuts its set into micro-batches). Beside it: Captions, a batch of
sampled captions and its micro-batches; captioning SFT's targets and loss (caption_ids, caption_loss); and
what the LoRA stages do to either architecture's LLM (LLM_LORA_TARGETS, checkpoint_llm_layers).
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from data import DataError, to_uint8_hwc
from shapes import object_question

LLM_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # all linears of the text model (DESIGN §3)
PAPER_CAPTION_PROMPT = "Given an input image, generate a textual description of the image."  # released UAE inference


@dataclass
class Captions:
    """G sampled captions per image, image-major (rows g*... of one image are consecutive)."""
    prompt: dict  # processor outputs for the N = B*G rows (images repeated G times)
    ids: torch.Tensor  # (N, L) completion token ids, pad after the first eos
    mask: torch.Tensor  # (N, L) 1 up to and including the first eos
    texts: list[str]
    log_probs: torch.Tensor | None = None  # (N, L) fp32 log-probs the tokens were drawn with (UMM2.caption), if recorded

    def rows(self, part: slice) -> "Captions":
        """Rows `part` (a micro-batch) with their prompt rows. Qwen2.5-VL's pixel_values holds every row's
        image patches one after another (image_grid_thw: t * h * w patches per row's image), so it is cut
        at their offsets; Janus's has one image per row."""
        packed = "image_grid_thw" in self.prompt
        prompt = {k: v[part] for k, v in self.prompt.items() if not (packed and k == "pixel_values")}
        if packed and "pixel_values" in self.prompt:
            ends = self.prompt["image_grid_thw"].prod(-1).cumsum(0)
            first, last = range(len(ends))[part][0], range(len(ends))[part][-1]
            prompt["pixel_values"] = self.prompt["pixel_values"][(ends[first - 1] if first else 0):ends[last]]
        return Captions(prompt, self.ids[part], self.mask[part], self.texts[part],
                        None if self.log_probs is None else self.log_probs[part])


class Captioner:
    """What both architectures share (UAE in model.py, UMM2 in umm2.py): on the I2T side the caption prompt's
    processor inputs, the completion mask and the count of captions the length cap stopped; the text checks;
    and encoder RL's drift anchor on the decoder's reading of captions. A subclass has processor, tokenizer,
    caption_prompt, device, caption_cap(), condition(), turn_lengths() and max_text_tokens."""

    def caption_inputs(self, images, num_samples: int = 1, prompts: list[str] | None = None) -> dict:
        """Processor inputs for the caption prompt (or one user prompt per image), each image repeated
        num_samples times (left-padded)."""
        turn = lambda text: self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}], add_generation_prompt=True, tokenize=False)
        texts = [turn(t) for t in prompts for _ in range(num_samples)] if prompts else [turn(self.caption_prompt)] * (len(images) * num_samples)
        images = [to_uint8_hwc(im) for im in images for _ in range(num_samples)]
        batch = self.processor(text=texts, images=images, return_tensors="pt", padding=True, padding_side="left")
        return {k: v.to(self.device) for k, v in batch.items()}

    def completion_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """1 for every token up to and including the first eos (the tokens the policy chose)."""
        is_eos = ids == self.tokenizer.eos_token_id
        after_eos = (is_eos.cumsum(1) - is_eos.long()) > 0
        return (~after_eos).long()

    def captions_cut(self, texts: list[str], max_new_tokens: int = 0) -> int:
        """How many caption texts the length cap stopped before their eos: a caption that ended has at most
        cap - 1 tokens besides its eos. Nothing is cut silently: eval_unified reports this count."""
        cap = self.caption_cap(max_new_tokens)
        return sum(len(ids) >= cap for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"])

    def unknown_words(self, texts: list[str]) -> list[list[str]]:
        """Per text, the words its tokenizer can only map to the unknown token (the shapes world's word-level
        tokenizer has one; a byte-level BPE never needs it): they would reach the model as [UNK]."""
        unk = self.tokenizer.unk_token_id
        if unk is None or not texts:
            return [[] for _ in texts]
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [[text[a:b] for i, (a, b) in zip(ids, spans) if i == unk and text[a:b] != self.tokenizer.unk_token]
                for text, ids, spans in zip(texts, enc["input_ids"], enc["offset_mapping"])]

    def known_words(self) -> str:
        """The vocabulary in an error message: listed when it is a small world's, else its size."""
        vocab = self.tokenizer.get_vocab()
        if len(vocab) > 200:
            return f"{len(vocab)} tokens"
        special = set(self.tokenizer.all_special_tokens)
        return ", ".join(sorted(w for w in vocab if w not in special))

    def check_texts(self, records: list[dict], field: str, window: bool = True) -> list[str]:
        """The `field` text of every record (training targets, or captions the decoder is asked to draw), each
        checked before any work: missing or empty, with words the tokenizer does not know (never a silent
        [UNK]) or, with `window`, longer than the decoder's text window, it is an error naming the first
        such record's file:line and how many there are. The window (turn_lengths, max_text_tokens) is the UAE
        decoder's text window, the UMM2's context less an image's tokens."""
        def fail(bad: list[int], problem: str):
            raise DataError(f"{records[bad[0]]['where']}: \"{field}\" {problem} ({len(bad)} such line(s) in all)")
        empty = [i for i, r in enumerate(records) if not (isinstance(r.get(field), str) and r[field].strip())]
        if empty:
            fail(empty, "is missing or empty")
        texts = [r[field] for r in records]
        unknown = self.unknown_words(texts)
        bad = [i for i, words in enumerate(unknown) if words]
        if bad:
            fail(bad, f"has words the tokenizer does not know: {', '.join(map(repr, unknown[bad[0]]))}; the model "
                      f"would read them as {self.tokenizer.unk_token}. Known words: {self.known_words()}")
        if window:
            lengths = self.turn_lengths(texts)
            bad = [i for i, n in enumerate(lengths) if n > self.max_text_tokens]
            if bad:
                fail(bad, f"takes {lengths[bad[0]]} tokens, more than the decoder's window of max_text_tokens="
                          f"{self.max_text_tokens}")
        return texts

    def drift(self, texts: list[str], reference: torch.Tensor, part: slice = slice(None), allow_cut: bool = False):
        """condition_drift of the rows `part` of an anchor set (its texts, and their frozen conditioning
        `reference`, under no_grad), weighted by its share of the rows: the parts of a partition add up to the
        whole set's drift, so each part can run and backpropagate on its own, and the anchor's activations
        are bounded by a micro-batch, not by the set (33 texts x 512 tokens at paper scale: ~89 GB). The
        part's conditioning is left-padded with zeros to the set's width: a UMM2's prompts are left-padded
        to the longest of the rows conditioned together (a UAE's all have the window's width)."""
        rows = range(len(texts))[part]
        cond = self.condition(texts[part], allow_cut)
        cond = F.pad(cond, (0, 0, reference.shape[1] - cond.shape[1], 0))
        return condition_drift(cond, reference[part], reference.float().pow(2).mean(), len(rows) / len(texts))


def caption_ids(model: Captioner, texts: list[str]) -> torch.Tensor:
    """Assistant-turn targets: caption + the closing eos (<|im_end|>), right-padded with the pad token."""
    tok = model.tokenizer
    rows = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, rows))
    return torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows], device=model.device)


def caption_loss(model: Captioner, rt, images, targets: list[str], scenes, n: int, grounding: float) -> torch.Tensor:
    """Captioning SFT of a UAE or a UMM2 (pretrain_encoder.py, pretrain_umm2.py): cross-entropy of the answers
    of n random examples, image and prompt masked. An answer is the example's caption `targets[i]` after the
    caption prompt or, with probability `grounding`, the answer to a question about one object of its scene
    (shapes.object_question; scenes may be None when grounding is 0)."""
    idx = torch.randint(0, len(targets), (n,))
    ask = (torch.rand(n) < grounding).tolist()
    choice = torch.randint(0, 1 << 30, (n,)).tolist()
    turns = [object_question(scenes[i], c) if a else (model.caption_prompt, targets[i])
             for i, a, c in zip(idx.tolist(), ask, choice)]
    ids = caption_ids(model, [answer for _, answer in turns])
    with rt.autocast(training=True):
        prompt = model.caption_inputs(images[idx], prompts=[question for question, _ in turns])
        logp = model.caption_logprobs(prompt, ids, temperature=1.0)
    mask = ids != model.tokenizer.pad_token_id
    return -torch.where(mask, logp, 0.0).sum() / mask.sum()


def condition_drift(cond: torch.Tensor, reference: torch.Tensor, power: torch.Tensor | None = None,
                    share: float = 1.0) -> torch.Tensor:
    """Squared distance of the decoder's conditioning from a frozen reference, relative to the latter's
    size (fp32). An LLM adapter (cold start, encoder RL) lives in the one LLM that also encodes captions
    for the decoder (DESIGN §3); unanchored it moves the generate-role states the DiT was trained on.
    For some rows of a set (Captioner.drift): `power` = the whole reference's mean square, `share` = the rows'
    fraction of the set, so that the parts' values add up to the whole set's."""
    cond, reference = cond.float(), reference.float()
    return ((cond - reference) ** 2).mean() * share / (reference.pow(2).mean() if power is None else power)


def anchor_slices(parts: list[slice]) -> list[slice]:
    """Each micro-batch's rows of an anchor set that is the batch's texts followed by one more (the "" of
    the CFG negative): the last micro-batch also takes that one."""
    return parts[:-1] + [slice(parts[-1].start, None)]


def checkpoint_llm_layers(llm, enable: bool = True) -> None:
    """Activation checkpointing of the LLM's text decoder layers (a LoRA stage's memory at paper scale,
    plan.py): each layer keeps only its input for the backward, which recomputes the layer's forward, one
    layer at a time. Non-reentrant torch.utils.checkpoint: frozen bf16 weights, inputs without gradients and
    the fp32 adapters need nothing special, and the recompute runs under the autocast state of the forward.
    It uses transformers' own per-layer switch (GradientCheckpointingLayer reads `gradient_checkpointing` and
    `_gradient_checkpointing_func`), which checkpoints `forward`, not `__call__`, so FSDP2's hooks stay outside,
    and acts only in training mode with gradients on (the stages call model.train() before their backward;
    captioning and no-grad passes are untouched). Set here rather than by gradient_checkpointing_enable, which
    is renamed between transformers 5.0 and 5.24 and hooks the embeddings to require a gradient that only
    reentrant checkpointing needs. The recompute reads a LoRA layer's `enabled` at backward time: a forward
    with gradients is backpropagated before lora_disabled switches it (the stages' reference passes have no
    gradients). The vision tower has no trained weights and no inputs with gradients: nothing to recompute."""
    from functools import partial
    from torch.utils.checkpoint import checkpoint
    for layer in llm.model.language_model.layers:
        layer.gradient_checkpointing = enable
        layer._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
