# Paper scale, Unified-Bench Protocol 1 (DESIGN §7) with the released scorer's four judges:
#   python eval_unified.py config/paper_eval.py --ckpt=out/paper_grpo_decoder --data=/data/unified_bench
# --data is the folder of source images (or a JSONL); [R] the released UAE code and scorer, [-] our choice.
out_dir = "out/paper_eval"
clip = "hf:/ckpt/clip-vit-large-patch14"  # [R] CLIP ViT-L/14
longclip = "open_clip:ViT-L-14-quickgelu:/ckpt/longclip-L.pt"  # [R] LongCLIP-L (its checkpoint in open_clip's layout)
dinov2 = "hf:/ckpt/dinov2-large"  # [R]
dinov3 = "hf:/ckpt/dinov3-vitl16-pretrain-lvd1689m"  # [R]
reward_backbone = ""  # the paper's reward CLIP is its clip judge too (the other three judges are independent of it)
greedy = True  # [-] deterministic captions
max_new_tokens = 0  # [R] the release caps captions at 512 new tokens; 0 = the decoder's 512-token window minus the generate-turn prefix, the most that reaches the decoder whole (model.caption_cap refuses more)
sample_steps = 40  # [R]
cfg_scale = 5.0  # [R]
batch_size = 4  # [-] 1024 px
geneval = False  # GenEval-shapes needs the shapes world's scenes
weights_dtype = "bfloat16"  # [-] half the memory of fp32
