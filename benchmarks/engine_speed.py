#!/usr/bin/env python
"""Rollout speed of the engines side by side, in one process, alternating: the ``hf`` engine's modes
(Hugging Face ``generate``; ``refill``; ``sampling_weights``; optionally static cache / compile and
transformers' own continuous batching) and vLLM (``vllm``, needs vLLM's environment:
``bash scripts/setup_vllm.sh``, docs/engines.md)::

    python benchmarks/engine_speed.py --no-vllm                              # hf modes, SmolLM2-135M, .venv
    python benchmarks/engine_speed.py --no-vllm --model tiny --eos-prob 0.05 --reps 2 --threads 1   # seconds (smoke)
    python benchmarks/engine_speed.py --no-vllm --hf-variants --hf-cb        # + static cache, compile, generate_batch
    .venv-vllm/bin/python benchmarks/engine_speed.py                    # + vLLM (eager); --compiled: + compiled

What runs: the main job's prompts (``experiment=dsrl_smollm2_cpu``: reasoning-gym one-digit
additions, its system prompt, the model's chat template; batch r of the training order in rep r),
8 prompts x 4 samples, up to 64 new tokens, T = 1.0, top-p 1, top-k 0, float32 weights,
``--threads`` torch threads, ``--generation-batch-size`` rows per call (refill: rows at once).
Lengths: SmolLM2 samples its own (printed per call: median, max, truncated share); the tiny random
model gets an RL-like mix, mostly short with a few stragglers at the limit, from ``--eos-prob`` (its
end token's probability per step, calibrated on its own samples; 0.05 with 64 tokens: geometric
lengths, a few percent truncated), else it never ends. Each rep runs every mode once on the same
batch, the order alternating between reps; rep 0 is a warm-up and is excluded.

Modes: ``hf`` (default engine), ``hf-refill`` (``refill: true``), ``hf-autocast`` (default engine
under ``torch.autocast(bf16, cache_enabled=False)``, as Lightning's ``bf16-mixed`` runs it),
``hf-bf16`` (``sampling_weights: bfloat16`` under that autocast), ``hf-refill-bf16`` (both); with
``--hf-variants`` ``hf-static`` / ``hf-compiled``; with ``--hf-cb`` ``hf-cb`` (transformers'
``generate_batch``, paged KV cache sized to the batch).

With ``--temperature 0`` each rep also prints whether every mode's greedy tokens equal ``hf``'s
(the autocast modes: ``hf-autocast``'s). Reported per mode, median over reps: generated tokens (end token included) per second of
``engine.generate``; ms per decode step (time inside one-token forwards / their number; for
``hf-cb``, whose forwards mix prefill and decode tokens, all forwards); decoded row-steps (rows x
one-token forwards) over generated tokens (1.0 = no row decoded past its end); and each figure's
ratio to ``hf`` measured in the same reps. For vLLM also the build time and the weight-sync time
(``sync_weights``), median of ``--syncs``.

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


def calibrate_end_token(policy, tokenizer, prompt_ids, prompt_mask, eos_prob: float) -> None:
    """Give the end token about ``eos_prob`` per step on the model's own samples (its LM-head row
    set along the mean last hidden state, scale bisected), so responses end at RL-like lengths."""
    from prerl.engines import build_engine

    head, eos = policy.lm_head.weight, tokenizer.eos_token_id
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        head[eos] = 0
        torch.manual_seed(0)
        out = build_engine("hf", policy=lambda: policy, tokenizer=tokenizer).generate(prompt_ids, prompt_mask, 2, 32,
                                                                                      1.0, 1.0, 0)
        full = torch.cat([prompt_ids.repeat_interleave(2, 0), out.response_ids], 1)
        full_mask = torch.cat([prompt_mask.repeat_interleave(2, 0), out.response_mask], 1)
        hidden = policy(input_ids=full, attention_mask=full_mask, output_hidden_states=True).hidden_states[-1]
        hidden = hidden[:, prompt_ids.shape[1]:][out.response_mask.bool()]
        direction, lo, hi = hidden.mean(0), 0.0, 1e4
        for _ in range(60):
            head[eos] = (lo + hi) / 2 * direction
            p = torch.softmax(hidden @ head.T, -1)[:, eos].mean()
            lo, hi = ((lo + hi) / 2, hi) if p < eos_prob else (lo, (lo + hi) / 2)


class DecodeMeter:
    """Times the one-token forwards of a model (pre/post hooks) and counts their rows."""

    def __init__(self, model, all_forwards: bool = False):
        self.all_forwards, self.seconds, self.steps, self.rows, self._t = all_forwards, 0.0, 0, 0, None
        self._hooks = [model.register_forward_pre_hook(self._pre, with_kwargs=True),
                       model.register_forward_hook(self._post)]

    def _pre(self, _, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self._t = None
        if ids is not None and (self.all_forwards or ids.shape[1] == 1):
            self.steps, self.rows, self._t = self.steps + 1, self.rows + ids.shape[0], time.perf_counter()

    def _post(self, *_):
        if self._t is not None:
            self.seconds += time.perf_counter() - self._t

    def reset(self):
        self.seconds, self.steps, self.rows = 0.0, 0, 0

    def remove(self):
        for hook in self._hooks:
            hook.remove()


class ContinuousBatchingEngine:
    """transformers' ``generate_batch`` (continuous batching, paged KV cache) behind the engine
    interface, for comparison only: its KV cache is sized to the batch (``num_blocks``), not 60% of RAM."""

    def __init__(self, policy, tokenizer, page_size: int = 64):
        self.policy, self.tokenizer, self.page_size = policy, tokenizer, page_size

    def generate(self, prompt_ids, prompt_mask, num_samples, max_new_tokens, temperature, top_p, top_k=0,
                 generation_batch_size=None):
        from transformers import ContinuousBatchingConfig, GenerationConfig

        from prerl.engines.base import Generation
        from prerl.padding import responses_from_lists, unpad_prompts
        from prerl.rollout import eos_ids

        prompts = [p for p in unpad_prompts(prompt_ids, prompt_mask) for _ in range(num_samples)]
        eos = eos_ids(self.policy.generation_config, self.tokenizer)
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                  top_p=top_p if temperature > 0 else None, top_k=top_k or None,
                                  max_new_tokens=max_new_tokens, eos_token_id=eos, pad_token_id=self.tokenizer.pad_token_id)
        longest = max(map(len, prompts)) + max_new_tokens
        rows = min(generation_batch_size or len(prompts), len(prompts))
        cb = ContinuousBatchingConfig(page_size=self.page_size, num_blocks=rows * (-(-longest // self.page_size) + 1),
                                      max_batch_tokens=max(256, rows * 8), seed=int(torch.randint(0, 2**31, ())))
        self.policy.eval()
        try:
            with torch.random.fork_rng(devices=[]):  # it re-seeds torch's global generator
                out = self.policy.generate_batch(prompts, generation_config=config, continuous_batching_config=cb,
                                                 warmup=False)
        finally:
            self.policy.train()
        tokens = [list(r.generated_tokens) for r in out.values()]
        return Generation(*responses_from_lists(tokens, eos, self.tokenizer.pad_token_id))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--generation-batch-size", type=int, default=None,
                    help="rows per generate call (refill: rows decoding at once); default all")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--eos-prob", type=float, default=None,
                    help="tiny model: calibrate its end token to this probability per step (RL-like lengths)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=6, help="timed reps per engine (after one warm-up rep)")
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--compiled", action="store_true", help="also time vLLM with torch.compile (enforce_eager=False)")
    ap.add_argument("--hf-variants", action="store_true",
                    help="also time the hf engine with a static KV cache, and with it torch.compiled (engine_options)")
    ap.add_argument("--hf-cb", action="store_true", help="also time transformers' continuous batching (generate_batch)")
    ap.add_argument("--no-vllm", action="store_true", help="hf engines only (runs in the project's .venv)")
    ap.add_argument("--wait", type=int, default=10, help="tries to find a quiet machine before timing")
    ap.add_argument("--max-busy", type=float, default=0.15)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    if args.eos_prob is not None and args.model != "tiny":
        ap.error("--eos-prob calibrates the tiny model (SmolLM2 ends on its own, and ties its LM head to its embeddings)")

    torch.set_num_threads(args.threads)
    from prerl.engines import build_engine

    load_before = wait_until_quiet(args.max_busy, args.wait)
    spec, tokenizer, policy = build(args.model)
    data = batches(tokenizer, args.prompts, args.reps + 1)
    if args.eos_prob is not None:
        calibrate_end_token(policy, tokenizer, data[0]["prompt_ids"], data[0]["prompt_mask"], args.eos_prob)
    hf = lambda **options: build_engine("hf", policy=lambda: policy, tokenizer=tokenizer, **options)  # noqa: E731
    # name -> (engine, under Lightning's bf16-mixed autocast)
    engines = {"hf": (hf(), False), "hf-refill": (hf(refill=True), False), "hf-autocast": (hf(), True),
               "hf-bf16": (hf(sampling_weights="bfloat16"), True),
               "hf-refill-bf16": (hf(refill=True, sampling_weights="bfloat16"), True)}
    info = {}
    if args.hf_variants:
        engines["hf-static"] = (hf(static_cache=True), False)
        engines["hf-compiled"] = (hf(compile=True), False)
    if args.hf_cb:
        engines["hf-cb"] = (ContinuousBatchingEngine(policy, tokenizer), False)
    variants = [] if args.no_vllm else [("vllm", True)] + ([("vllm-compiled", False)] if args.compiled else [])
    for name, eager in variants:
        t0 = time.perf_counter()
        engines[name] = (build_engine("vllm", policy=lambda: policy, tokenizer=tokenizer, enforce_eager=eager,
                                      max_model_len=512), False)
        info[name] = {"build_s": round(time.perf_counter() - t0, 2)}
        syncs = []
        for _ in range(args.syncs):
            t0 = time.perf_counter()
            engines[name][0].sync_weights(policy)
            syncs.append(time.perf_counter() - t0)
        info[name]["sync_s"] = [round(s, 3) for s in syncs]
        print(f"[{name}] built in {info[name]['build_s']} s; sync {statistics.median(syncs):.3f} s "
              f"(median of {len(syncs)}); torch threads {torch.get_num_threads()}", flush=True)

    names = list(engines)
    results = {n: [] for n in names}
    greedy_equal = {n: [] for n in names}
    for rep, batch in enumerate(data):
        order = names if rep % 2 == 0 else names[::-1]
        outs = {}
        for name in order:
            engine, autocast = engines[name]
            meter = None if name.startswith("vllm") else DecodeMeter(policy, all_forwards=name == "hf-cb")
            torch.manual_seed(rep)
            others = OthersMeter().start()
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast, cache_enabled=False):
                out = engine.generate(batch["prompt_ids"], batch["prompt_mask"], args.samples, args.max_new_tokens,
                                      args.temperature, 1.0, 0, args.generation_batch_size)
            dt = time.perf_counter() - t0
            busy = others.stop()
            tokens = int(out.response_mask.sum())
            row = {"rep": rep, "tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1),
                   "truncated": round(float(out.truncated.float().mean()), 3), "others_busy": round(busy, 3),
                   "loadavg1": round(os.getloadavg()[0], 2)}
            if meter is not None:
                meter.remove()
                row.update(ms_per_step=round(1000 * meter.seconds / max(meter.steps, 1), 3), steps=meter.steps,
                           row_steps_per_token=None if meter.all_forwards else round(meter.rows / tokens, 3))
            lengths = out.response_mask.sum(1).float()
            print(f"rep {rep}{' (warm-up)' if rep == 0 else ''} {name:>14}: {tokens:5d} tokens in {dt:6.2f} s = "
                  f"{tokens / dt:7.1f} tok/s" + (f"; {row['ms_per_step']:.2f} ms/step x {meter.steps}, "
                                                 f"row-steps/token {row['row_steps_per_token']}" if meter else "")
                  + f"; length median {lengths.median():.0f} max {lengths.max():.0f}, truncated {row['truncated']:.2f}; "
                  f"others used {100 * busy:.0f}% CPU", flush=True)
            if rep > 0:
                results[name].append(row)
            outs[name] = out.response_ids * out.response_mask
        if args.temperature == 0:  # greedy: each mode's tokens against generate's in the same numerics
            same = {n: torch.equal(o, outs["hf-autocast" if engines[n][1] else "hf"]) for n, o in outs.items()}
            for n in names:
                greedy_equal[n].append(same[n])
            print(f"rep {rep} greedy tokens equal to hf (autocast modes: to hf-autocast): {same}", flush=True)

    summary = {}
    base = results["hf"]
    print(f"\nmedian over {len(base)} reps; ratios to hf are medians of per-rep ratios (same batch, same rep)")
    print(f"{'mode':>14} {'tok/s':>8} {'x hf':>6} {'ms/step':>8} {'x hf':>6} {'row-steps/token':>16}")
    for name, rows in results.items():
        median = lambda key, rs=rows: statistics.median(r[key] for r in rs)  # noqa: E731
        ratio = lambda key, rs=rows: statistics.median(r[key] / b[key] for r, b in zip(rs, base))  # noqa: E731
        entry = {"tokens_per_s_median": median("tokens_per_s"), "tokens_per_s_vs_hf": round(ratio("tokens_per_s"), 3),
                 "min": min(r["tokens_per_s"] for r in rows), "max": max(r["tokens_per_s"] for r in rows),
                 "others_busy_max": max(r["others_busy"] for r in rows), **info.get(name, {})}
        if args.temperature == 0:
            entry["greedy_equal_all_reps"] = all(greedy_equal[name])
        if "ms_per_step" in rows[0]:
            entry.update(ms_per_step_median=median("ms_per_step"), ms_per_step_vs_hf=round(ratio("ms_per_step"), 3),
                         row_steps_per_token_median=None if rows[0]["row_steps_per_token"] is None
                         else round(median("row_steps_per_token"), 3))
        summary[name] = entry
        step = (f"{entry['ms_per_step_median']:8.2f} {entry['ms_per_step_vs_hf']:6.2f} "
                f"{entry['row_steps_per_token_median'] or '-':>16}" if "ms_per_step_median" in entry
                else f"{'-':>8} {'-':>6} {'-':>16}")
        print(f"{name:>14} {entry['tokens_per_s_median']:8.1f} {entry['tokens_per_s_vs_hf']:6.2f} {step}", flush=True)
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
