# Paper scale (DESIGN §2, §4.2): projector + SD3.5-Large MM-DiT on long captions, Qwen2.5-VL-3B frozen.
#   torchrun --nproc_per_node=8 pretrain_decoder.py config/paper_pretrain_decoder.py --data_dir=/data/longcap
# data_dir holds train.jsonl / val.jsonl of (image, long caption) lines (DESIGN §5). GenEval-shapes needs
# the shapes world's scenes, so here a probe is the text-reliance ratio alone, run once, at the last step.
init_from = "pretrained"
qwen_dir = "/ckpt/Qwen2.5-VL-3B-Instruct"
sd3_dir = "/ckpt/stable-diffusion-3.5-large"
weights_dtype = "bfloat16"  # the frozen LLM in bf16; under fsdp the trained projector + DiT become fp32 masters
fsdp = True  # 8.06B DiT: fp32 weights, grads, AdamW and EMA (20 B/param) split over the GPUs (torchrun)
grad_checkpointing = True  # 1024^2 samples: recompute DiT blocks in the backward
micro_batch = 2  # samples per forward/backward on a GPU; 64 / 8 GPUs = 8 per rank, 4 micro-batches
out_dir = "out/paper_pretrain_decoder"
new_decoder = False  # keep SD3.5's DiT and VAE; only the projector is new
vae_dir = ""
image_size = 1024  # SD3.5-Large's native resolution
cache_features = False  # 700K images: encode on the fly
batch_size = 64
lr = 1e-4
warmup = 1000
max_steps = 20000
cfg_scale = 5.0  # the released inference setting
sample_steps = 40
eval_interval = 10 ** 9
save_interval = 1000
captions = "caption:1"  # the paper corpus: one long caption per image
