#!/usr/bin/env bash
# The main job: the whole UAE pipeline on the shapes world with default configs, then Unified-Bench
# on every stage, ending with one table (out/speedrun/results.md and results.json).
#
#   bash speedrun.sh                 # training stages under torchrun: one process per GPU (CPU: see below)
#   NPROC=1 bash speedrun.sh       # plain python for every stage
#
# Re-running skips stages whose checkpoints are complete; an interrupted run continues where it
# stopped (every stage resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")"
# On the 2-core CPU (torchrun gives each process one thread), measured per step: pretrain_encoder 0.22 s in
# two 1-thread processes vs 0.19 s in one 2-thread process (ENCODER_NPROC=1), but every measured chain of
# this world used two, and the one chain with one (a new VAE too) trained its decoder slower (RESULTS.md,
# session 7), so two stay until that is separated; pretrain_decoder 0.09 s compiled in one process (its
# matmuls use both threads well, and the all-reduce costs more than the Python overhead it hides).
GPUS=$(python -c 'import torch; print(torch.cuda.device_count())')
NPROC="${NPROC:-$([ "$GPUS" -gt 0 ] && echo "$GPUS" || python -c 'import os; print(min(2, os.cpu_count()))')}"
ENCODER_NPROC="${ENCODER_NPROC:-$NPROC}"
DECODER_NPROC="${DECODER_NPROC:-$([ "$GPUS" -gt 0 ] && echo "$NPROC" || echo 1)}"
OUT=out/speedrun
mkdir -p "$OUT"
START=$(date +%s)
run() {  # run N script args...: a training script in N processes (torchrun when N > 1)
    local n=$1; shift
    if [ "$n" -gt 1 ]; then
        python -m torch.distributed.run --standalone --nproc_per_node="$n" "$@"
    else
        python "$@"
    fi
}
stamp() { echo "=== $1 ($(( $(date +%s) - START ))s) ==="; }

stamp "prepare: the shapes world, its tokenizer and reward CLIP"
[ -f data/shapes/shapes_clip_eval.json ] || python data/shapes/prepare.py
stamp "the world's VAE"
[ -f data/shapes/vae/config.json ] || python data/shapes/train_vae.py
stamp "pretrain_encoder (base captioner, short captions)"
run $ENCODER_NPROC pretrain_encoder.py --out_dir=$OUT/pretrain_encoder
stamp "pretrain_decoder (long captions)"
run $DECODER_NPROC pretrain_decoder.py --init_from=$OUT/pretrain_encoder --out_dir=$OUT/pretrain_decoder
stamp "cold_start"
run $NPROC cold_start.py --init_from=$OUT/pretrain_decoder --out_dir=$OUT/cold_start
stamp "grpo_encoder (Generation for Understanding)"
run $NPROC grpo_encoder.py --init_from=$OUT/cold_start --out_dir=$OUT/grpo_encoder
stamp "grpo_decoder (Understanding for Generation)"
run $NPROC grpo_decoder.py --init_from=$OUT/grpo_encoder --out_dir=$OUT/grpo_decoder

# Unified-Bench on the 100-image bench (the Unified-Score, its reward cosine, the ceiling), and the oracle
# tables on the 2,000-image test split (understanding, GenEval-shapes, Unified-Score with intervals)
for stage in pretrain_decoder cold_start grpo_encoder grpo_decoder; do
    name=$stage; [ $stage = pretrain_decoder ] && name=base
    for split in bench test; do
        dir=$OUT/eval_$name; [ $split = test ] && dir=${dir}_test
        stamp "Unified-Bench: $name on $split"
        [ -f $dir/results.json ] && [ $dir/results.json -nt $OUT/$stage/model.json ] || \
            python eval_unified.py --ckpt=$OUT/$stage --data=data/shapes/$split.jsonl --out_dir=$dir
    done
done
python - "$OUT" "$START" <<'EOF'
import json, sys, time
from eval_unified import decoder_comparison, paired_difference
out, start = sys.argv[1], int(sys.argv[2])
names = ("base", "cold_start", "grpo_encoder", "grpo_decoder")
bench = {n: json.load(open(f"{out}/eval_{n}/results.json")) for n in names}
test = {n: json.load(open(f"{out}/eval_{n}_test/results.json")) for n in names}
stages = {}
for n in names:
    b, t = bench[n], test[n]
    u, g = t["understanding"], t["generation"]
    stages[n] = {"small_object_recall": u["small_object_recall"], "caption_length": u["caption_length"],
                 "precision": u["precision"], "attribute_accuracy": u["attribute_accuracy"],
                 "mentioned_object_recall": t["unification"]["mentioned_object_recall"],
                 "geneval_shapes": g["overall"], "geneval_shapes_3plus": g["overall_3plus"],
                 "scene_f1": t["unification"]["scene_f1"], "captions_cut": t["unification"]["captions_cut"],
                 "unified_score": b["unified_score"], "reward_cosine": b["reward_cosine"],
                 "unified_score_ci95": paired_difference(bench["base"]["unified_score_per_image"], b["unified_score_per_image"])["ci95"],
                 "unified_score_test": t["unified_score"],
                 "unified_score_test_ci95": paired_difference(test["base"]["unified_score_per_image"], t["unified_score_per_image"])["ci95"]}
splits = {s: sum(1 for _ in open(f"data/shapes/{s}.jsonl")) for s in ("train", "val", "test", "bench")}
result = {"stages": stages, "judges": bench["base"]["model_types"], "splits": splits,
          "unified_score_ceiling": bench["base"]["generation"]["unified_score"],
          "unified_score_ceiling_test": test["base"]["generation"]["unified_score"],
          "wall_seconds": int(time.time()) - start}
# stage 3 alone on test: RL encoder + pretrained decoder (before) vs the full loop (after)
big = {r["image"].split("/")[-1] for r in map(json.loads, open("data/shapes/test.jsonl")) if len(r["scene"]) >= 3}
rows = decoder_comparison(test["grpo_encoder"], test["grpo_decoder"], big)
diff = paired_difference(test["grpo_encoder"]["unified_score_per_image"], test["grpo_decoder"]["unified_score_per_image"])
result["decoder_rl"] = {"n": len(test["grpo_decoder"]["generation"]["overall_per_image"]),
                        "geneval_shapes_before": rows["geneval_shapes"]["before"], "geneval_shapes_after": rows["geneval_shapes"]["after"],
                        "mcnemar_p": rows["geneval_shapes"]["p"],
                        "geneval_shapes_3plus_before": rows["geneval_shapes_3plus"]["before"],
                        "geneval_shapes_3plus_after": rows["geneval_shapes_3plus"]["after"],
                        "unified_score_diff": diff["mean"], "unified_score_diff_ci95": diff["ci95"], "table": rows}
json.dump(result, open(f"{out}/results.json", "w"), indent=1)
keys = [k for k in stages["base"] if not k.endswith("ci95")]
table = ["| stage | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
table += [f"| {n} | " + " | ".join(f"{v[k]:.3f}" for k in keys) + " |" for n, v in stages.items()]
ci = lambda v, k: f"{v[k][0]:+.2f}..{v[k][1]:+.2f}"
table.append(f"\nUnified-Score: judges {', '.join(result['judges'])}; bench, and test in unified_score_test. Ceiling (the "
             f"pretrained decoder from the true long captions): {result['unified_score_ceiling']:.2f} (test "
             f"{result['unified_score_ceiling_test']:.2f}). Paired 95% intervals against base: "
             + ", ".join(f"{n} {ci(v, 'unified_score_ci95')} (test {ci(v, 'unified_score_test_ci95')})"
                         for n, v in stages.items() if n != "base"))
table += ["\nDecoder RL on test (before: RL encoder + pretrained decoder; after: the full loop; complete captions, "
          "then partial ones): McNemar for rates, paired t for means", "", "| figure | before | after | p |", "|---|---|---|---|"]
table += [f"| {k} | {v['before']:.3f} | {v['after']:.3f} | {v['p']:.2g} |" for k, v in rows.items()]
table.append(f"Unified-Score (reconstructions) {diff['mean']:+.2f}, 95% {diff['ci95'][0]:+.2f}..{diff['ci95'][1]:+.2f}\n")
table.append(f"splits {splits}; wall time (this invocation): {result['wall_seconds']} s")
open(f"{out}/results.md", "w").write("\n".join(table) + "\n")
print("\n".join(table))
# the picture: source | base caption + reconstruction | RL caption + reconstruction (first 8 bench images)
import numpy as np
from PIL import Image
from data import read_jsonl, save_grid
pixels = lambda path: np.asarray(Image.open(path).convert("RGB"))
lines = {n: [json.loads(l) for l in open(f"{out}/eval_{n}/captions.jsonl")][:8] for n in ("base", "grpo_decoder")}
rows = [(pixels(src["image_path"]),) + sum(((lines[n][i]["caption"], pixels(f"{out}/eval_{n}/reconstructions/{lines[n][i]['image']}"))
                                            for n in ("base", "grpo_decoder")), ()) for i, src in enumerate(read_jsonl("data/shapes/bench.jsonl")[:8])]
save_grid(rows, f"{out}/base_vs_rl.png", text_width=240)
EOF
