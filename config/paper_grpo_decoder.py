# Paper scale, Unified-GRPO stage 3, Understanding for Generation (DESIGN §4.5): after config/paper_grpo_encoder.py,
#   torchrun --nproc_per_node=8 grpo_decoder.py config/paper_grpo_decoder.py --data_dir=/data/longcap
# Where each value comes from: [R] the released UAE code (DESIGN §3), [F] Flow-GRPO's published GenEval setting
# for SD3.5 (config/grpo.py geneval_sd3 of github.com/yifan123/flow_grpo), [-] neither (our choice).
init_from = "out/paper_grpo_encoder"
out_dir = "out/paper_grpo_decoder"
weights_dtype = "bfloat16"  # [-] frozen 3.75B LLM + 8.06B DiT in bf16: 23.6 GB instead of 47 GB
image_size = 1024  # [R] (Flow-GRPO trains SD3.5-M at 512)
reward_backbone = "hf:/ckpt/clip-vit-large-patch14"  # the paper's reconstruction reward, CLIP ViT-L/14
lora_r = 32  # [R] [F]
lora_alpha = 64  # [R] [F]
lr = 3e-4  # [F]
max_steps = 300  # [-]
captions_per_step = 48  # [F] 48 prompts per epoch
group_size = 24  # [F] images per prompt
micro_batch = 1  # [-] memory: 144 trajectories per rank (6 captions x 24), one per DiT batch of 2 (CFG) in sampling and update (python plan.py: ~64 GB per GPU; 2: ~102, all at once: ~5.5 TB)
greedy_captions = True  # [-]
max_new_tokens = 0  # [R] the release caps captions at 512 new tokens; 0 = the decoder's 512-token window minus the generate-turn prefix, the most that reaches the decoder whole (model.caption_cap refuses more)
train_steps = 10  # [F] denoising reduction: 10 sampling steps in training
eval_steps = 40  # [F] [R] 40 at evaluation
noise_level = 0.7  # [F]
cfg_scale = 5.0  # [R] (Flow-GRPO: 4.5 for SD3.5-M)
timestep_fraction = 0.99  # [F]
clip_eps = 1e-4  # [F]
adv_clip = 5.0  # [F]
advantage_std = "batch"  # [F] global_std = True
beta = 0.004  # [F] 0.04 times |dt| = 0.1: grpo.step_kl is the exact KL, 1/|dt| larger than Flow-GRPO's
eval_interval = 10 ** 9  # GenEval-shapes needs the shapes world's scenes
save_interval = 20
