"""Time and memory of the two GRPO steps, broken down, on any config, CPU or GPU.

Runs grpo_encoder.py and grpo_decoder.py for a few steps through their own main() (so the numbers are
those of the real code paths) into a scratch directory, then reads their per-step logs:

    python bench.py --init_from=out/speedrun/cold_start
    python bench.py --init_from=out/x --script_args="--images_per_step=16 --group_size=8"

Prints per kind: median seconds per step and its split (caption generation / image decoding or
sampling / reward / policy forward-backward), samples per second, and peak memory (CUDA: max
allocated; CPU: growth of the process's peak RSS). The first step is warm-up and is excluded.
Speed and memory targets live here, not in tests.
"""
import json
import resource
import shutil
import statistics
import sys
import tempfile

import torch

from configurator import configure

config = dict(
    init_from="out/speedrun/cold_start",  # checkpoint for grpo_encoder; grpo_decoder starts from the same
    data_dir="data/shapes",  # dataset folder
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # reward spec
    steps=4,  # steps per kind (the first is warm-up)
    kinds="encoder,decoder",  # which GRPO steps to time
    script_args="",  # extra --key=value flags for both scripts (space separated)
    device="auto",  # auto = cuda if available else cpu
    threads=0,  # torch CPU threads (0 = default)
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def bench(kind: str, cfg) -> dict:
    import grpo_decoder
    import grpo_encoder
    script = {"encoder": grpo_encoder, "decoder": grpo_decoder}[kind]
    out = tempfile.mkdtemp(prefix=f"bench_{kind}_")
    args = [f"--init_from={cfg.init_from}", f"--data_dir={cfg.data_dir}", f"--out_dir={out}/ckpt",
            f"--reward_backbone={cfg.reward_backbone}", f"--max_steps={cfg.steps}", f"--save_interval={cfg.steps}",
            f"--eval_interval={10 ** 9}", f"--device={cfg.device}", f"--threads={cfg.threads}"] + cfg.script_args.split()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    rss_before = peak_rss_mb()
    script.main(args)
    memory = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else peak_rss_mb() - rss_before
    rows = [json.loads(line) for line in open(f"{out}/ckpt/log.jsonl")][1:]  # drop the warm-up step
    run = json.load(open(f"{out}/ckpt/config.json"))
    shutil.rmtree(out, ignore_errors=True)
    samples = run["group_size"] * run["images_per_step" if kind == "encoder" else "captions_per_step"]
    median = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k == "seconds" or k.startswith("t_")}
    return {"kind": kind, "median_seconds_per_step": median, "samples_per_second": round(samples / median["seconds"], 2),
            "samples_per_step": samples, "peak_memory_mb": round(memory, 1)}


def main(argv=None):
    cfg = configure(config, argv)
    for kind in cfg.kinds.split(","):
        print(json.dumps(bench(kind, cfg)))


if __name__ == "__main__":
    main(sys.argv[1:])
