#!/usr/bin/env python
"""Rollout speed of the two engines side by side: Hugging Face ``generate`` (``hf``) and vLLM
(``vllm``), in one process, alternating, on the main job's rollout shape. Needs vLLM's
environment (``bash scripts/setup_vllm.sh``, docs/engines.md)::

    /work/vllm-venv/bin/python benchmarks/engine_speed.py                 # SmolLM2-135M, 8 x 4, 64 tokens, 2 threads
    /work/vllm-venv/bin/python benchmarks/engine_speed.py --compiled      # also vLLM with torch.compile
    /work/vllm-venv/bin/python benchmarks/engine_speed.py --model tiny --reps 2 --threads 1   # seconds (smoke)
    python benchmarks/engine_speed.py --no-vllm --hf-variants            # the hf engine's static cache / compile, .venv

What runs: the main job's prompts (``experiment=dsrl_smollm2_cpu``: reasoning-gym one-digit
additions, its system prompt, SmolLM2's chat template; batch r of the training order in rep r),
8 prompts x 4 samples, up to 64 new tokens, T = 1.0, top-p 1, top-k 0, fp32, ``--threads`` torch
threads. Both engines sample from the same policy weights; each rep runs every engine once on the
same batch, the order alternating between reps; rep 0 is a warm-up and is excluded. Reported per
engine: generated tokens (end token included) per second of ``engine.generate``, median (min-max)
over reps. For vLLM also the build time and the weight-sync time (``sync_weights``: gather the HF
state dict, reload it in place, reset the prefix cache), median of ``--syncs``.

Load: the machine must be quiet. Before starting, the script waits (``--wait`` tries, 30 s apart)
until other processes use under ``--max-busy`` of the CPUs (from /proc/stat, this process idle),
and it reports, per timed call, the CPU share that other processes used meanwhile
(all CPU time from /proc/stat minus this process's), plus the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402

SYSTEM_PROMPT = "Answer with only the final number."  # configs/data/gym_arithmetic.yaml
GYM = dict(task="basic_arithmetic", size=2000, seed=1, config=dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                                                                     operators=["+"], allow_parentheses=False, allow_negation=False))


def _cpu_jiffies() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    hz = os.sysconf("SC_CLK_TCK")
    idle = fields[3] + fields[4]
    return (sum(fields) - idle) / hz, sum(fields) / hz


def _own_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class OthersMeter:
    """CPU share used by other processes between ``start()`` and ``stop()`` (0 = quiet, 1 = all CPUs)."""

    def start(self):
        self.busy, self.total = _cpu_jiffies()
        self.own = _own_cpu()
        return self

    def stop(self) -> float:
        busy, total = _cpu_jiffies()
        others = (busy - self.busy) - (_own_cpu() - self.own)
        return max(0.0, others / max(total - self.total, 1e-9))


def wait_until_quiet(max_busy: float, tries: int) -> list[dict]:
    seen = []
    for attempt in range(tries):
        meter = OthersMeter().start()
        time.sleep(3.0)
        busy = meter.stop()
        # ps's %CPU is a lifetime average: a hint at who is busy, the measured share above is the figure
        top = subprocess.run(["ps", "-eo", "pid,pcpu,etimes,args", "--sort=-pcpu"], capture_output=True, text=True).stdout
        heavy = [line.strip()[:160] for line in top.splitlines()[1:8]
                 if line.split() and float(line.split()[1]) > 20 and int(line.split()[0]) != os.getpid()]
        seen.append({"time": datetime.now().isoformat(timespec="seconds"), "others_busy": round(busy, 3),
                     "loadavg": os.getloadavg(), "heavy_processes": heavy})
        print(f"[load] others use {100 * busy:.0f}% of the CPUs, load average {os.getloadavg()[0]:.2f}"
              + (f"; busy: {heavy}" if heavy else ""), flush=True)
        if busy < max_busy:
            return seen
        if attempt + 1 < tries:
            time.sleep(30)
    print("[load] the machine did not get quiet: timings below are under contention", flush=True)
    return seen


def build(model: str):
    if model == "tiny":
        from prerl.models import TinyModelSpec

        spec = TinyModelSpec(hidden_size=128, num_heads=2, num_kv_heads=1, max_position_embeddings=512)
    else:
        from prerl.models import SmolLM2Spec

        spec = SmolLM2Spec(cache_dir=str(ROOT / "data" / "models" / "smollm2-135m-instruct"))
    tokenizer = spec.build_tokenizer()
    return spec, tokenizer, spec.build_model().train()


def batches(tokenizer, n_prompts: int, count: int) -> list[dict]:
    from prerl.data import PromptDataModule, ReasoningGymSource

    dm = PromptDataModule(train=ReasoningGymSource(**GYM), tokenizer=tokenizer, system_prompt=SYSTEM_PROMPT,
                          batch_size=n_prompts, max_prompt_length=128, seed=0)
    dm.setup("fit")
    out = []
    for batch in dm.train_dataloader():
        out.append(batch)
        if len(out) == count:
            return out
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6, help="timed reps per engine (after one warm-up rep)")
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="also time vLLM with torch.compile (enforce_eager=False)")
    ap.add_argument("--hf-variants", action="store_true",
                    help="also time the hf engine with a static KV cache, and with it torch.compiled (engine_options)")
    ap.add_argument("--no-vllm", action="store_true", help="hf engines only (runs in the project's .venv)")
    ap.add_argument("--wait", type=int, default=10, help="tries to find a quiet machine before timing")
    ap.add_argument("--max-busy", type=float, default=0.15)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    from prerl.engines import build_engine

    load_before = wait_until_quiet(args.max_busy, args.wait)
    spec, tokenizer, policy = build(args.model)
    data = batches(tokenizer, args.prompts, args.reps + 1)
    engines, info = {"hf": build_engine("hf", policy=lambda: policy, tokenizer=tokenizer)}, {}
    if args.hf_variants:
        engines["hf-static"] = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer, static_cache=True)
        engines["hf-compiled"] = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer, compile=True)
    variants = [] if args.no_vllm else [("vllm", True)] + ([("vllm-compiled", False)] if args.compiled else [])
    for name, eager in variants:
        t0 = time.perf_counter()
        engines[name] = build_engine("vllm", policy=lambda: policy, tokenizer=tokenizer, enforce_eager=eager,
                                     max_model_len=512)
        info[name] = {"build_s": round(time.perf_counter() - t0, 2)}
        syncs = []
        for _ in range(args.syncs):
            t0 = time.perf_counter()
            engines[name].sync_weights(policy)
            syncs.append(time.perf_counter() - t0)
        info[name]["sync_s"] = [round(s, 3) for s in syncs]
        print(f"[{name}] built in {info[name]['build_s']} s; sync {statistics.median(syncs):.3f} s "
              f"(median of {len(syncs)}); torch threads {torch.get_num_threads()}", flush=True)

    names = list(engines)
    results = {n: [] for n in names}
    for rep, batch in enumerate(data):
        order = names if rep % 2 == 0 else names[::-1]
        for name in order:
            torch.manual_seed(rep)
            meter = OthersMeter().start()
            t0 = time.perf_counter()
            out = engines[name].generate(batch["prompt_ids"], batch["prompt_mask"], args.samples, args.max_new_tokens,
                                         args.temperature, 1.0, 0)
            dt = time.perf_counter() - t0
            others = meter.stop()
            tokens = int(out.response_mask.sum())
            row = {"rep": rep, "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
                   "truncated": round(float(out.truncated.float().mean()), 3), "others_busy": round(others, 3),
                   "loadavg1": round(os.getloadavg()[0], 2)}
            print(f"rep {rep}{' (warm-up)' if rep == 0 else ''} {name:>13}: {tokens:5d} tokens in {dt:6.2f} s = "
                  f"{tokens / dt:7.1f} tok/s; truncated {row['truncated']:.2f}; others used {100 * others:.0f}% CPU",
                  flush=True)
            if rep > 0:
                results[name].append(row)

    summary = {}
    for name, rows in results.items():
        tps = [r["tokens_per_s"] for r in rows]
        summary[name] = {"tokens_per_s_median": statistics.median(tps), "min": min(tps), "max": max(tps),
                         "others_busy_max": max(r["others_busy"] for r in rows), **info.get(name, {})}
        print(f"{name:>13}: {statistics.median(tps):7.1f} tok/s median ({min(tps):.1f}-{max(tps):.1f}) over {len(tps)} reps",
              flush=True)
    import transformers

    report = {
        "date": datetime.now().isoformat(timespec="seconds"), "command": " ".join([sys.executable] + sys.argv),
        "args": vars(args), "torch": torch.__version__, "transformers": transformers.__version__,
        "vllm": None if args.no_vllm else __import__("vllm").__version__, "cpus": os.cpu_count(), "load_before": load_before,
        "summary": summary, "runs": results,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
