"""The paper-scale loading path, `UAE.from_pretrained(qwen_dir, sd3_dir)`, on tiny directories built here.

The fixture writes, offline and in seconds, a Qwen2.5-VL-3B-Instruct-shaped directory (byte-level BPE
Qwen2Tokenizer with Qwen's special tokens and a ChatML template, the real Qwen2_5_VLProcessor, a 2-layer
Qwen2_5_VLForConditionalGeneration) and a StableDiffusion3Pipeline directory (MM-DiT, VAE, shifted
flow-matching scheduler, two CLIP text encoders with projection, a T5 encoder, their tokenizers).
"""
import json
import os
import sys

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from a hub, ever
REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import model as M  # noqa: E402
import shapes  # noqa: E402

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
    core.train_from_iterator([M.PAPER_CAPTION_PROMPT, "a cat sits on a red mat.", "a dog and a blue square at the top left.",
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
    assert m.scheduler.config.shift == 3.0 and m.caption_prompt == M.PAPER_CAPTION_PROMPT
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
        assert n == 4 and 1 <= length <= 5 and c.mask.shape == c.logp.shape == c.ids.shape and len(c.texts) == 4
        mask = c.mask.bool()
        assert torch.isfinite(c.logp[mask]).all() and (c.logp[mask] <= 0).all() and torch.all(c.logp[~mask] == 0)
        assert mask[:, 0].all()  # the first sampled token is always the policy's choice
        assert torch.equal(c.prompt["input_ids"][0], c.prompt["input_ids"][1])  # image-major repeats
        assert not np.isin(c.ids[mask].numpy(), m.banned_token_ids).any()
        with torch.no_grad():
            forced = m.caption_logprobs(c.prompt, c.ids)
        assert forced.shape == c.ids.shape
        torch.testing.assert_close(forced[mask], c.logp[mask], atol=1e-4, rtol=1e-4)

        images_out = m.generate(c.texts, steps=2, cfg_scale=2.0)
        assert images_out.shape == (4, 3, 16, 16) and images_out.dtype == torch.float32  # 8x8 latents, 2x VAE
        assert torch.isfinite(images_out).all() and images_out.min() >= 0 and images_out.max() <= 1
        with torch.no_grad():
            z = m.encode_images(images_out)
            assert z.shape == m.latent_shape(4) == (4, 4, 8, 8)
            sde = m.sample_sde(m.condition(c.texts), steps=3)
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
    assert meta["caption_prompt"] == M.PAPER_CAPTION_PROMPT
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
