"""Kill every training stage with SIGKILL at random moments; rerun the same command; check that it ends
bit-identical to a run never stopped, and that whatever a kill left behind loads (issue 27, DESIGN §8).

    python tools/kill_resume.py                                  # 10 kills x 5 stages on a tiny world it builds
    python tools/kill_resume.py --stages=cold_start --kills=3 --world=/tmp/world --work_dir=/tmp/kr

Each stage runs a tiny config (the tests' sizes, every process on one thread) in a fresh process, as a user
would, starting from the previous stage's reference checkpoint:
1. the reference: the command run uninterrupted; its final checkpoint's fingerprint (SHA-256 of every tensor
   of every safetensors file, and of training_state.pt's optimizer, step, RNG states, reward cache and run
   history without its timings) and its timeline: when each step, eval and save began and how long it took
   (phases: from the log lines and from the save's out_dir.tmp, watched);
2. `kills` times: the same command into a fresh out_dir, SIGKILLed during a step, an eval and a save in turn
   (cold_start has no eval): which one of them is drawn at random, and the moment uniformly within its
   duration in the reference (start-up, imports and model building, takes most of a tiny run and a kill
   there, before anything is saved, tests little). Where the kill landed is then read from what it left:
   out_dir.tmp / .old (a save in progress), else the last log line. What the kill left must load: the
   directory a rerun resumes from (out_dir, or the .old of a save stopped between its renames) through
   UAE.load and training_state.pt. Then the same command runs to completion and its fingerprint is compared
   with the reference's. A run that ends before its kill is rerun and compared too, and tried again.
Prints a table: stage, kills, where they landed, loadable, identical; exits 1 unless every rerun is identical
and every state loads. The world (--world, else built into work_dir: prepare.py's smallest world and an
untrained tiny VAE) needs train/val JSONL, tokenizer/, vae/ and shapes_clip.pt. 10 kills x 5 stages: 13
minutes on 2 CPU cores (all 50 reruns identical, every state loadable: RESULTS.md).
"""
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "data", "shapes"))
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402

import common  # noqa: E402
import model as M  # noqa: E402
from configurator import at_least, configure, must  # noqa: E402

config = dict(
    stages="pretrain_encoder,pretrain_decoder,cold_start,grpo_encoder,grpo_decoder",  # in order: each starts from the previous one's reference
    kills=10,  # SIGKILLs per stage, each followed by a rerun to completion
    max_steps=8,  # steps of every run
    save_interval=2,  # steps between checkpoints (small: kills land in saves too)
    eval_interval=3,  # steps between probes (stages that have them)
    world="",  # a prepared tiny world; empty = build one in work_dir
    work_dir="out/kill_resume",  # runs go here (emptied first)
    seed=0,  # draws the kill moments
)
STAGES = ("pretrain_encoder", "pretrain_decoder", "cold_start", "grpo_encoder", "grpo_decoder")
rules = dict(  # valid values beyond the types (configurator)
    stages=must(lambda v, c: v and all(s in STAGES for s in v.split(",")), "a comma-separated list of " + ", ".join(STAGES)),
    kills=at_least(1),
    max_steps=at_least(2),
    save_interval=at_least(1),
    eval_interval=at_least(1),
    world=must(lambda v, c: not v or os.path.isfile(os.path.join(v, "train.jsonl")), "empty or a prepared world (train.jsonl)"),
)
PREVIOUS = dict(zip(STAGES[1:], STAGES))  # the reference checkpoint a stage starts from
EVALUATES = {"pretrain_encoder", "pretrain_decoder", "grpo_encoder", "grpo_decoder"}  # stages that probe at eval_interval


def build_world(root: str) -> str:
    """The smallest world prepare.py makes (64 train scenes, reward CLIP of 2 steps) and an untrained tiny VAE."""
    import prepare
    import train_vae
    prepare.main([f"--out_dir={root}", "--n_train=64", "--n_val=16", "--n_test=8", "--n_bench=8", "--clip_steps=2",
                  "--clip_batch=8", "--clip_eval_n=8", "--judge_steps=1", "--dino_steps=1", "--judge_batch=4", "--threads=1"])
    torch.manual_seed(0)
    train_vae.build_vae(configure(train_vae.config, ["--block_out_channels=(8,8,8)", "--latent_channels=4",
                                                     "--norm_num_groups=4"])).save_pretrained(os.path.join(root, "vae"))
    return root


def command(stage: str, cfg, world: str, refs: dict, out: str) -> list[str]:
    """The stage's tiny run: the tests' model sizes, one thread, a log line every step."""
    reward = f"--reward_backbone=open_clip:ShapesCLIP:{world}/shapes_clip.pt"
    lora = ["--lora_r=4", "--lora_alpha=8", reward]
    args = {
        "pretrain_encoder": [f"--tokenizer_dir={world}/tokenizer", f"--vae_dir={world}/vae", "--llm_hidden=64", "--llm_layers=2",
                             "--vision_hidden=32", "--vision_layers=1", "--batch_size=8", "--eval_n=4", "--max_new_tokens=8",
                             "--lr=3e-3", "--warmup=2"],
        "pretrain_decoder": [f"--vae_dir={world}/vae", "--dit_layers=1", "--dit_heads=2", "--dit_head_dim=16", "--joint_dim=32",
                             "--projector_hidden=32", "--batch_size=8", "--eval_n=4", "--sample_steps=2", "--compile=False"],
        "cold_start": ["--batch_size=4", "--sample_steps=2", "--max_new_tokens=8"] + lora,
        "grpo_encoder": ["--images_per_step=2", "--group_size=3", "--max_new_tokens=8", "--decode_steps=2", "--probe_n=4",
                         "--compile=False"] + lora,
        "grpo_decoder": ["--captions_per_step=2", "--group_size=3", "--max_new_tokens=8", "--train_steps=4", "--eval_steps=2",
                         "--eval_n=4"] + lora,
    }[stage]
    start = [f"--init_from={refs[PREVIOUS[stage]]}"] if stage in PREVIOUS else []
    every = [f"--data_dir={world}", f"--out_dir={out}", f"--max_steps={cfg.max_steps}", f"--save_interval={cfg.save_interval}",
             "--log_interval=1", "--threads=1"] + ([f"--eval_interval={cfg.eval_interval}"] if stage in EVALUATES else [])
    return [sys.executable, "-u", os.path.join(REPO, f"{stage}.py")] + every + start + args


class Run:
    """A stage's process: its stdout lines and the moments its save's out_dir.tmp appears and goes (the save is
    written there, then renamed into place), in seconds since the start."""

    def __init__(self, cmd: list[str], out: str, log: str):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.t0, self.out, self.log, self.lines, self.saves = time.time(), out, log, [], []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True, cwd=REPO, env=env)
        self.threads = [threading.Thread(target=f, daemon=True) for f in (self.read, self.watch)]
        for thread in self.threads:
            thread.start()

    def read(self):
        for line in self.proc.stdout:
            self.lines.append((time.time() - self.t0, line.rstrip("\n")))

    def watch(self):
        while self.proc.poll() is None:
            there, now = os.path.exists(self.out + ".tmp"), time.time() - self.t0
            if there and (not self.saves or self.saves[-1][1] is not None):
                self.saves.append([now, None])
            elif not there and self.saves and self.saves[-1][1] is None:
                self.saves[-1][1] = now
            time.sleep(0.002)

    def finish(self) -> float:
        code = self.proc.wait()
        for thread in self.threads:
            thread.join()
        if code:
            tail = "".join(open(self.log).readlines()[-30:])
            raise RuntimeError(f"{self.proc.args[2]} exited with {code}; its stderr ({self.log}) ends:\n{tail}")
        return time.time() - self.t0

    def kill(self):
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        for thread in self.threads:
            thread.join()

    def seen(self, event) -> float | None:
        """When `event` happened (None: not yet): a log line starting so, or ("save", j), the j-th save's start."""
        if isinstance(event, tuple):
            return self.saves[event[1]][0] if len(self.saves) > event[1] else None
        return next((t for t, line in self.lines if line.startswith(event)), None)


def phases(run: Run, stage: str, cfg) -> dict[str, list[tuple]]:
    """The reference's steps, evals and saves, each as (the event that opens it, how long it lasted): a step whose
    iteration neither evaluates nor saves opens at the previous step's log line and ends at its own; an eval opens
    at its step's log line and ends at its last "eval step" line; a save lasts as long as its .tmp."""
    when = lambda prefix: max(t for t, line in run.lines if line.startswith(prefix))
    evals = [n for n in range(1, cfg.max_steps + 1) if stage in EVALUATES and (n % cfg.eval_interval == 0 or n == cfg.max_steps)]
    saved = [n for n in range(1, cfg.max_steps + 1) if n % cfg.save_interval == 0 or n == cfg.max_steps]
    found = {"step": [(f"step {n} ", when(f"step {n + 1} ") - when(f"step {n} "))
                      for n in range(1, cfg.max_steps) if n not in evals and n not in saved],
             "eval": [(f"step {n} ", when(f"eval step {n} ") - when(f"step {n} ")) for n in evals],
             "save": [(("save", j), end - begin) for j, (begin, end) in enumerate(run.saves)]}
    return {name: occurrences for name, occurrences in found.items() if occurrences}


def fingerprint(directory: str) -> str:
    """SHA-256 of a checkpoint's tensors (every safetensors file, by relative path and key) and its training state
    (optimizer, step, RNG, reward cache, run history without timings; not the config, whose out_dir differs)."""
    h = hashlib.sha256()

    def add(value):
        if isinstance(value, torch.Tensor):
            h.update(f"{value.dtype}{tuple(value.shape)}".encode())
            h.update(value.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if value.numel() else b"")
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                if not str(key).startswith(("seconds", "t_")):  # the history's timings
                    h.update(str(key).encode())
                    add(value[key])
        elif isinstance(value, (list, tuple)):
            for item in value:
                add(item)
        else:
            h.update(repr(value).encode())
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(f for f in files if f.endswith(".safetensors")):
            path = os.path.join(root, name)
            with safe_open(path, "pt") as f:
                h.update(os.path.relpath(path, directory).encode())
                add({key: f.get_tensor(key) for key in f.keys()})
    state = common.load_training_state(directory)
    add({k: v for k, v in state.items() if k != "config"})
    return h.hexdigest()


def landed(run: Run, out: str, stage: str, cfg) -> str:
    """Where a kill landed: a save in progress leaves out.tmp (being written) or out.old (between the renames);
    else the last step / eval line says whether the run was in a step, an eval or about to save."""
    if os.path.exists(out + ".tmp") or os.path.exists(out + ".old"):
        return "save"
    last = None
    for _, line in run.lines:
        m = re.match(r"(eval )?step (\d+)\b", line)
        if m:
            last = (bool(m.group(1)), int(m.group(2)))
    evaluated, step = last  # a kill comes after the first step's line
    if stage in EVALUATES and not evaluated and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
        return "eval"
    return "save" if step % cfg.save_interval == 0 or step == cfg.max_steps else "step"


def loads(out: str) -> str:
    """'ok' if the state a rerun resumes from (out_dir, else a whole .old) loads, 'nothing saved' if there is none;
    else the error."""
    directory = out if os.path.isdir(out) else out + ".old"
    if not os.path.exists(os.path.join(directory, "training_state.pt")):
        return "nothing saved"
    try:
        common.load_training_state(directory)
        M.UAE.load(directory)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "ok"


def main(argv=None):
    cfg = configure(config, argv, rules)
    t_all = time.time()
    shutil.rmtree(cfg.work_dir, ignore_errors=True)
    os.makedirs(cfg.work_dir)
    work = os.path.abspath(cfg.work_dir)
    world = os.path.abspath(cfg.world) if cfg.world else build_world(os.path.join(work, "world"))
    rng, refs, rows, failures = random.Random(cfg.seed), {}, [], []
    stages = cfg.stages.split(",")
    for stage in STAGES[:max(map(STAGES.index, stages)) + 1]:  # the earlier ones give the later ones their start
        os.makedirs(os.path.join(work, stage))
        ref = os.path.join(work, stage, "reference")
        run = Run(command(stage, cfg, world, refs, ref), ref, ref + ".stderr")
        seconds = run.finish()
        refs[stage] = ref
        if stage not in stages:  # only a start for a later stage
            continue
        expected, timeline = fingerprint(ref), phases(run, stage, cfg)
        print(f"{stage}: reference {seconds:.1f} s, fingerprint {expected[:16]}; " + ", ".join(
            f"{len(v)} {k}s of {sum(d for _, d in v) / len(v):.2f} s" for k, v in timeline.items()), flush=True)
        row = {"stage": stage, "kills": 0, "step": 0, "eval": 0, "save": 0, "after the end": 0, "nothing saved": 0,
               "loadable": 0, "identical": 0, "reference_s": seconds}
        for k in range(3 * cfg.kills):  # a run that ends before its kill is tried again
            if row["kills"] == cfg.kills:
                break
            aim = list(timeline)[k % len(timeline)]  # a step, an eval, a save in turn; which one and when in it: random
            event, lasted = rng.choice(timeline[aim])
            delay = rng.uniform(0, lasted)
            out = os.path.join(work, stage, f"kill{k}")
            run = Run(command(stage, cfg, world, refs, out), out, out + ".stderr")
            while run.seen(event) is None and run.proc.poll() is None:
                time.sleep(0.002)
            at = (run.seen(event) or 0.0) + delay
            while time.time() - run.t0 < at and run.proc.poll() is None:
                time.sleep(0.002)
            if run.proc.poll() is None:
                run.kill()
                where, state = landed(run, out, stage, cfg), loads(out)
                row["kills"] += 1
                row["loadable"] += state in ("ok", "nothing saved")
                row["nothing saved"] += state == "nothing saved"
            else:  # it finished first: no kill, but the rerun must still find it complete
                run.finish()
                where, state = "after the end", "ok"
            row[where] += 1
            Run(command(stage, cfg, world, refs, out), out, out + ".rerun.stderr").finish()
            same = fingerprint(out) == expected
            row["identical"] += same
            print(f"  run {k + 1}: aimed {delay:.2f} s into {'an' if aim == 'eval' else 'a'} {aim}, landed in {where}; left state: {state}; "
                  f"rerun identical: {same}", flush=True)
            if not same or state not in ("ok", "nothing saved"):
                failures.append(f"{stage} run {k + 1} ({out}): state {state}, identical {same}")
        rows.append(row)
    print("\n| stage | kills | in a step | in an eval | in a save | finished first | states loadable (of which nothing saved yet) "
          "| reruns identical | reference run |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['stage']} | {r['kills']} | {r['step']} | {r['eval']} | {r['save']} | {r['after the end']} | "
              f"{r['loadable']}/{r['kills']} ({r['nothing saved']}) | {r['identical']}/{r['kills'] + r['after the end']} | {r['reference_s']:.1f} s |")
    print(f"\ntotal {time.time() - t_all:.0f} s")
    if failures:
        print("FAILED:\n" + "\n".join(failures))
        sys.exit(1)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
