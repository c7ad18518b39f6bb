# Paper scale, Unified-GRPO stage 2, Generation for Understanding (DESIGN §4.4): after config/paper_cold_start.py,
#   torchrun --nproc_per_node=8 grpo_encoder.py config/paper_grpo_encoder.py --data_dir=/data/longcap
# Where each value comes from: [R] the released UAE code (DESIGN §3), [P] the paper, [G] the GRPO defaults
# of DESIGN §4, [-] none of them (our choice).
init_from = "out/paper_cold_start"
out_dir = "out/paper_grpo_encoder"
weights_dtype = "bfloat16"  # [-] frozen 3.75B LLM + 8.06B DiT in bf16: 23.6 GB instead of 47 GB
image_size = 1024  # [R]
reward_backbone = "hf:/ckpt/clip-vit-large-patch14"  # [P] cos(f_CLIP(x), f_CLIP(x_hat))
lora_r = 32  # [R]
lora_alpha = 64  # [R]
lr = 1e-5  # [-] (the shapes world's 2e-4 is for a 2M-parameter LLM)
max_steps = 1000  # [-]
images_per_step = 32  # [-] 4 per GPU
group_size = 8  # [G]
micro_batch = 2  # [-] memory: 32 captions per rank (4 images x 8) in update micro-batches of 2, each with its share of the drift anchor, and rollout decodes of 2 (python plan.py: ~33 GB per GPU; 3: ~37, 4: ~40, all 32 at once: ~130)
grad_checkpointing = True  # [-] recompute the LLM's 36 layers in the update's backward (python plan.py: activations 29.8 -> 3.2 GB, total ~57 -> ~33 GB per GPU, for +1% FLOPs, ~1 s of a ~128 s step): room for what the plan does not count (sampling's KV cache, the allocator's slack), and the stage fits a 40 GB GPU
temperature = 0.7  # [R]
max_new_tokens = 0  # [R] the release caps captions at 512 new tokens; 0 = the decoder's 512-token window minus the generate-turn prefix, the most that reaches the decoder whole (model.caption_cap refuses more)
decode_steps = 20  # [-] the frozen decoder's reward sampler (inference uses 40)
cfg_scale = 5.0  # [R]
clip_eps = 0.2  # [G]
clip_eps_high = 0.28  # [-] DAPO's clip-higher
beta = 0.04  # [G]
anchor_weight = 1.0  # [-] the shapes world's
eval_interval = 10 ** 9  # the small-object probe needs the shapes world's scenes
save_interval = 50
