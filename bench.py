"""Time and memory of the two GRPO steps, broken down, on any config, CPU or GPU.

Runs grpo_encoder.py and grpo_decoder.py for a few steps through their own main() (so the numbers are
those of the real code paths) into a scratch directory, then reads their per-step logs:

    python bench.py --init_from=out/speedrun/cold_start
    python bench.py --init_from=out/x --encoder_args="--images_per_step=16 --group_size=8" --decoder_args="--group_size=16"

Prints per kind: median seconds per step and its split (caption generation / image decoding or
sampling / reward / policy forward-backward), samples per second, peak memory of a fresh process
running the steps (CUDA: max allocated; CPU: the process's peak RSS, weights and interpreter
included), FLOPs per step and MFU (DESIGN §9): the step's
FLOPs (torch's FlopCounterMode on a 2-step minus a 1-step run: the second step alone) per median
second, as a fraction of this machine's measured matmul peak in the autocast dtype (nanoGPT's MFU,
with a measured rather than a datasheet peak). The first timed step is warm-up and is excluded.
Speed and memory targets live here, not in tests.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from common import RULES
from configurator import at_least, configure, must, one_of, parses

config = dict(
    init_from="out/speedrun/cold_start",  # checkpoint for grpo_encoder; grpo_decoder starts from the same
    data_dir="data/shapes",  # dataset folder
    reward_backbone="open_clip:ShapesCLIP:data/shapes/shapes_clip.pt",  # reward spec
    steps=4,  # steps per kind (the first is warm-up)
    kinds="encoder,decoder",  # which GRPO steps to time
    encoder_args="",  # extra --key=value flags for grpo_encoder.py (space separated)
    decoder_args="",  # extra --key=value flags for grpo_decoder.py (space separated)
    peak_dtype="bfloat16",  # MFU denominator: matmul peak in this dtype (the scripts' autocast dtype)
    device="auto",  # auto = cuda if available else cpu
    threads=0,  # torch CPU threads (0 = default)
)
KINDS = ("encoder", "decoder")
rules = RULES | dict(  # valid values beyond the types (configurator), checked before any work; the shared keys' in common.RULES
    steps=at_least(2, "the first timed step is warm-up: at least one more is timed"),
    kinds=must(lambda v, c: v.split(",") and set(v.split(",")) <= set(KINDS) and len(set(v.split(","))) == len(v.split(",")),
               "a comma-separated subset of encoder, decoder (each once)"),
    encoder_args=parses(lambda v: script_config("encoder", v)),  # flags of grpo_encoder.py
    decoder_args=parses(lambda v: script_config("decoder", v)),  # flags of grpo_decoder.py
    peak_dtype=one_of("float32", "bfloat16", "float16"),
)


def script_config(kind: str, flags: str):
    """The config the script of `kind` reads from these extra flags: unknown keys and wrong types are named now."""
    import grpo_decoder
    import grpo_encoder
    return configure({"encoder": grpo_encoder, "decoder": grpo_decoder}[kind].config, flags.split())


def matmul_peak(dtype: torch.dtype, device: str, n: int = 2048, reps: int = 8) -> float:
    """Best-of-reps FLOP/s of an n x n matmul: what this machine can actually reach in `dtype`."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = float("inf")
    for _ in range(reps + 1):  # the first is warm-up
        sync = torch.cuda.synchronize if device.startswith("cuda") else lambda: None
        sync()
        t = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


# the timed run: the script's main() in a fresh process, which then reports its own peak memory
PEAK_MEMORY_RUN = """import resource, sys, torch, {module}
{module}.main(sys.argv[1:])
cuda = torch.cuda.max_memory_allocated() / 2 ** 20 if torch.cuda.is_available() else None
print("peak_memory_mb", cuda or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB"""


def script_args(kind: str, cfg, out: str, steps: int) -> list[str]:
    return [f"--init_from={cfg.init_from}", f"--data_dir={cfg.data_dir}", f"--out_dir={out}",
            f"--reward_backbone={cfg.reward_backbone}", f"--max_steps={steps}", f"--save_interval={steps}",
            f"--eval_interval={10 ** 9}", f"--device={cfg.device}", f"--threads={cfg.threads}"] + \
        getattr(cfg, f"{kind}_args").split()


def count_flops(script, args: list[str]) -> float:
    """FLOPs one in-process run of the real script executes."""
    with FlopCounterMode(display=False) as counter:
        script.main(args)
    return float(counter.get_total_flops())


def bench(kind: str, cfg, peak: float) -> dict:
    script = __import__(f"grpo_{kind}")
    out = tempfile.mkdtemp(prefix=f"bench_{kind}_")
    # FLOPs of one step = a 2-step run minus a 1-step run (setup, source caching and saving cancel out)
    step_flops = count_flops(script, script_args(kind, cfg, f"{out}/f2", 2)) - \
        count_flops(script, script_args(kind, cfg, f"{out}/f1", 1))
    here = os.path.dirname(os.path.abspath(__file__))  # the child imports the script from here, paths stay relative to cwd
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (here, os.environ.get("PYTHONPATH"))))}
    timed = subprocess.run([sys.executable, "-c", PEAK_MEMORY_RUN.format(module=script.__name__),
                            *script_args(kind, cfg, f"{out}/ckpt", cfg.steps)], capture_output=True, text=True, env=env)
    if timed.returncode:
        raise RuntimeError(f"bench: {script.__name__}.py failed:\n{timed.stderr[-3000:]}")
    memory = float(timed.stdout.strip().splitlines()[-1].split()[1])
    rows = [json.loads(line) for line in open(f"{out}/ckpt/log.jsonl")][1:]  # drop the warm-up step
    run = json.load(open(f"{out}/ckpt/config.json"))
    shutil.rmtree(out, ignore_errors=True)
    samples = run["group_size"] * run["images_per_step" if kind == "encoder" else "captions_per_step"]
    median = {k: round(statistics.median(r[k] for r in rows), 3) for k in rows[0] if k == "seconds" or k.startswith("t_")}
    return {"kind": kind, "median_seconds_per_step": median, "samples_per_second": round(samples / median["seconds"], 2),
            "samples_per_step": samples, "peak_memory_mb": round(memory, 1), "gflops_per_step": round(step_flops / 1e9, 2),
            "mfu": round(step_flops / median["seconds"] / peak, 4)}


def main(argv=None):
    cfg = configure(config, argv, rules)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    peak = matmul_peak(getattr(torch, cfg.peak_dtype), device)
    print(json.dumps({"device": device, "threads": torch.get_num_threads(), f"matmul_peak_gflops_{cfg.peak_dtype}": round(peak / 1e9, 1)}))
    for kind in cfg.kinds.split(","):
        print(json.dumps(bench(kind, cfg, peak)))


if __name__ == "__main__":
    main(sys.argv[1:])
