# Paper scale, Unified-GRPO stage 1 (DESIGN §4.3): after config/paper_pretrain_decoder.py,
#   torchrun --nproc_per_node=8 cold_start.py config/paper_cold_start.py --data_dir=/data/longcap
# Where each value comes from: [R] the released UAE code (DESIGN §3), [P] the paper, [-] neither gives it
# (our choice; the shapes world's value where it transfers).
init_from = "out/paper_pretrain_decoder"
out_dir = "out/paper_cold_start"
image_size = 1024  # [R] SD3.5-Large's native size, the released inference size
# memory (python plan.py: ~64 GB per GPU on 8 x 80 GB with the four settings below; whole batch, unsharded, fp32: ~2.9 TB)
weights_dtype = "bfloat16"  # [-] the frozen LLM and VAE in bf16 (7.7 GB instead of 15.4); projector, DiT and adapters stay fp32
fsdp = True  # [-] the trained 8.06B DiT's fp32 weights, grads and AdamW (16 B/param, ~130 GB) split over the GPUs
grad_checkpointing = True  # [-] recompute DiT blocks (through all 10 sampler steps), VAE decoder blocks and LLM layers in the backward: ~36 GB of activations an image instead of ~329 (the LLM's layers: 38.2 -> 35.6 GB, the captions' conditioning inside the largest term, the reconstruction, 2.7 -> 0.2 GB; the log-prob term 10.8 -> 1.4; +1% FLOPs)
micro_batch = 1  # [-] 64 / 8 GPUs = 8 images per rank, one at a time, each of its three loss terms backpropagated on its own (2 at a time: ~84 GB)
reward_backbone = "hf:/ckpt/clip-vit-large-patch14"  # [R] the released score module: CLIP ViT-L/14, 1 - cos
lora_r = 32  # [R]
lora_alpha = 64  # [R]
lr_lora = 5e-5  # [-]
lr_decoder = 2e-6  # [-] [P] says only "gently initialise"
max_steps = 500  # [-]
batch_size = 64  # [-]
sample_steps = 10  # [R] steps of the released code's differentiable sampler
temperature = 0.7  # [R]
max_new_tokens = 0  # [R] the release caps captions at 512 new tokens; 0 = the decoder's 512-token window minus the generate-turn prefix, the most that reaches the decoder whole (model.caption_cap refuses more)
ce_weight = 1.0  # [-]
anchor_weight = 3.0  # [-] chosen on the shapes world's val (RESULTS.md)
log_interval = 10
save_interval = 100
