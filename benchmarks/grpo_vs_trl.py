#!/usr/bin/env python
"""One GRPO configuration run in this framework and in TRL's ``GRPOTrainer``, side by side, plus
this framework's NSR-PreRL step (phase 1 of DSRL).

    pip install -c requirements/constraints.txt -e ".[bench]"       # TRL 1.16.0 (benchmark-only extra)
    python benchmarks/grpo_vs_trl.py                                 # SmolLM2-135M, 4 steps x 3 repeats, 2 threads
    python benchmarks/grpo_vs_trl.py --steps 6 --repeats 5 --json grpo_vs_trl.json
    python benchmarks/grpo_vs_trl.py --model tiny --steps 2 --repeats 1 --threads 1   # < 1 min (CI smoke)
    python benchmarks/grpo_vs_trl.py --override module.update.micro_batch_size=32      # any Hydra override

What runs. The main job's configuration (``experiment=dsrl_smollm2_cpu``: reasoning-gym one-digit
additions, its system prompt and the model's chat template, 8 prompts x 4 responses, up to 64 new
tokens, T = 1.0, top-p 1, top-k 0, AdamW lr 1e-5 / weight decay 0.01, gradient clipping 1.0,
micro-batches of 16 responses, fp32, no reference model, no gradient checkpointing), three ways:

- ``ours GRPO``: ``prerl.train.train(cfg)`` with ``objective=grpo``;
- ``TRL GRPO``: ``trl.GRPOTrainer`` (no vLLM, ``model.generate`` on the policy) configured from the
  SAME composed config (see ``trl_config``): ``loss_type="dapo"`` (token-mean over the whole
  batch), ``beta=0``, ``num_iterations=1``, ``per_device_train_batch_size`` = the micro-batch,
  ``gradient_accumulation_steps = steps_per_generation`` = responses / micro-batch (one generation
  and one optimizer step per batch of 8 prompts), ``scale_rewards="group"``, epsilon 0.2/0.2,
  ``bf16=False``, ``use_cpu=True`` on CPU, ``gradient_checkpointing=False``, ``disable_dropout``,
  ``top_k=0`` also in ``generation_kwargs``, a constant learning rate, the same AdamW instance
  construction (``cfg.module.optimizer`` applied to every parameter, as ours), the same prompts in
  the same order (the token ids of this framework's data module, checked to re-tokenise
  identically) and this project's reward (``build_reward(cfg.reward)``) wrapped as a TRL reward
  function;
- ``ours NSR-PreRL``: ``objective=nsr_prerl`` (the DSRL warm-up phase).

Each run is its own subprocess (its own peak RSS), runs alternate (ours GRPO, TRL, ours
NSR-PreRL, ours GRPO, ...), every process uses ``--threads`` torch threads, validation,
checkpoints, loggers and the cross-space diagnostics are off. Step 0 of every run is a warm-up
and is excluded; every figure is the median (min-max) over the remaining steps of all repeats
(memory and matmul figures: over runs).

What is not the same, by design or because TRL has no such setting: ours does not forward rows
whose advantage is 0 (exact: their gradient is 0; TRL forwards every row), and checks a dual clip
(inactive at one update per batch, where the ratio is 1); GRPO's std epsilon is 1e-6 here, 1e-4 in
TRL (both Bessel-corrected); both score only response positions through the LM head, each with
its own chunked implementation; TRL shuffles the rows before splitting them into micro-batches.
Both sample step 0 from the same random state (the report checks that step 0's responses agree);
their random streams differ afterwards, so later steps sample different responses.

Figures (measured unless marked estimate):
- step (s): wall time from the end of one optimizer step to the end of the next (Lightning's
  ``on_train_batch_end`` / HF ``on_step_end``): all of a step, data loading and logging included.
- generated tokens / step: response tokens sampled (end token included), and s / 1k generated
  tokens = step time per 1,000 of them.
- rollout (s): ours ``train/time/rollout_s`` (generate + decode + reward); TRL the time inside
  ``GRPOTrainer._generate_and_score_completions`` (tokenise, generate, decode, reward,
  advantages). update (s): ours ``train/time/update_s`` (advantages, loss terms, forward/backward,
  clipping, optimizer step); TRL the rest of the step (step - rollout). other (s): ours only, step
  - rollout - update (Lightning's loop, logging, data).
- reward mean: mean reward of the step's responses (context: rows with advantage 0 are not
  forwarded by ours, so the learning signal changes the update's cost; TRL forwards every row).
- trained tokens / step: prompt (or question-free context) + response tokens forwarded WITH
  gradient (counted in ``PolicyUpdater.score`` / ``_get_per_token_logps_and_entropies``).
- update GFLOP/s (ESTIMATE): 6 x (non-embedding parameters x trained tokens + LM-head parameters x
  trained response tokens) / update time. Both systems project only response positions through
  the LM head; attention-score FLOPs, the chunked head's recompute in backward and the optimizer
  are not counted. update / matmul peak: that divided by the measured matmul rate.
- matmul peak (GFLOP/s): a warm fp32 ``torch.mm`` of 2048 x 2048 with the same thread count, best
  of 4, measured in each subprocess before the model is loaded and again after training; the
  higher of the two (a warning is printed when the measurements disagree by over 25%: the machine
  was busy and the timings are not comparable).
- peak RSS (MiB): ``getrusage(RUSAGE_SELF).ru_maxrss`` of the process at the end (its whole life:
  imports, model load, training); above load: that minus the RSS when training starts (model,
  optimizer object and data built, the weights paged in; AdamW's state is allocated in the
  first step). On a GPU also ``torch.cuda.max_memory_allocated`` and the same above load.
- targets (issue "Performance"): ours NSR-PreRL step <= 0.5 x ours GRPO step; ours GRPO step <=
  0.6 x TRL's; peak memory ours / TRL <= 1 (above load, and absolute), each "met" or "missed".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
os.environ.setdefault("PRERL_ROOT", str(ROOT))

SYSTEMS = {  # name -> (label, objective)
    "ours_grpo": ("ours GRPO", "grpo"),
    "trl_grpo": ("TRL GRPO", "grpo"),
    "ours_nsr_prerl": ("ours NSR-PreRL", "nsr_prerl"),
}
STEP_FIGURES = (  # key, label, format
    ("step_s", "step (s)", "{:.3f}"),
    ("gen_tokens", "generated tokens / step", "{:.0f}"),
    ("s_per_1k_tokens", "s / 1k generated tokens", "{:.3f}"),
    ("rollout_s", "rollout (s)", "{:.3f}"),
    ("update_s", "update (s)", "{:.3f}"),
    ("other_s", "other (s)", "{:.3f}"),
    ("reward_mean", "reward mean", "{:.3f}"),
    ("trained_tokens", "trained tokens / step", "{:.0f}"),
    ("update_gflops", "update GFLOP/s (estimate)", "{:.2f}"),
    ("update_frac_of_peak", "update / matmul peak", "{:.3f}"),
)
RUN_FIGURES = (
    ("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
    ("peak_above_load_mib", "peak RSS above load (MiB)", "{:.0f}"),
    ("rss_at_load_mib", "RSS at load (MiB)", "{:.0f}"),
    ("cuda_peak_mib", "GPU peak allocated (MiB)", "{:.0f}"),
    ("cuda_peak_above_load_mib", "GPU peak above load (MiB)", "{:.0f}"),
    ("matmul_gflops", "matmul peak (GFLOP/s)", "{:.1f}"),
)
TARGETS = (  # key, label, numerator system, denominator system, figure, target
    ("nsr_prerl_over_grpo_step", "NSR-PreRL step / GRPO step (ours)", "ours_nsr_prerl", "ours_grpo", "step_s", 0.5),
    ("ours_over_trl_step", "GRPO step, ours / TRL", "ours_grpo", "trl_grpo", "step_s", 0.6),
    ("ours_over_trl_peak_above_load", "peak RSS above load, ours / TRL", "ours_grpo", "trl_grpo",
     "peak_above_load_mib", 1.0),
    ("ours_over_trl_peak_rss", "peak RSS absolute, ours / TRL", "ours_grpo", "trl_grpo", "peak_rss_mib", 1.0),
)


# ---------------------------------------------------------------------------------- shared helpers
def compose_cfg(args, objective: str, output_dir: Path):
    """The main job's config with ``objective``, validation/checkpoints/loggers off."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    overrides = [
        "experiment=dsrl_smollm2_cpu", f"model={args.model}", f"objective={objective}", f"reward={args.reward}",
        "~logger", "callbacks=none", "++callbacks.bench._target_=__main__.StepRecorder",
        f"trainer.max_steps={args.steps}", "validate_before=false", "validate_after=false",
        "trainer.limit_val_batches=0", "++trainer.enable_checkpointing=false", "trainer.enable_progress_bar=false",
        "module.cross_space_diagnostics_every_n_steps=0", f"seed={args.seed}",
    ]
    if args.device == "cuda":
        overrides += ["trainer.accelerator=gpu", "trainer.devices=1"]
    overrides += list(args.override)
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.paths.log_dir = str(output_dir)
    return cfg


def shape_of(cfg) -> dict:
    """The batch shape and precision a run was configured with (the report's header)."""
    roll = cfg.module.rollout
    return {"prompts": int(cfg.data.batch_size), "group_size": int(roll.group_size),
            "max_new_tokens": int(roll.max_new_tokens), "micro_batch_size": int(cfg.module["update"].micro_batch_size),
            "dtype": str(cfg.model.get("dtype", "?"))}


def flop_params(model) -> tuple[int, int]:
    """(non-embedding parameters excluding the LM head, LM-head parameters); tied weights once each."""
    embed = model.get_input_embeddings().weight
    head = model.get_output_embeddings().weight
    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    body = total - embed.numel() - (0 if head is embed else head.numel())
    return body, head.numel()


def matmul_gflops(device: str, n: int = 2048, reps: int = 4) -> float:
    """Best fp32 ``torch.mm`` rate of an n x n product, after a warm-up product."""
    import torch

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    out = torch.empty(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.mm(a, b, out=out)
    sync()
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        sync()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cuda_mib(peak: bool) -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20


class Recorder:
    """Per-step timings and token counts of one run (shared by both systems' hooks)."""

    def __init__(self):
        self.steps: list[dict] = []
        self.last_end: float | None = None
        self.trained_body = self.trained_head = 0
        self.rss_at_load = self.cuda_at_load = None
        self.params: tuple[int, int] | None = None

    def at_load(self, model) -> None:
        import torch

        with torch.no_grad():  # page in mmapped weights, so "above load" is training memory only
            for p in model.parameters():
                p.sum()
        self.rss_at_load, self.cuda_at_load = rss_mib(), cuda_mib(peak=False)
        self.params = flop_params(model)
        self.last_end = time.perf_counter()

    def count(self, body_tokens: int, head_tokens: int) -> None:
        self.trained_body += int(body_tokens)
        self.trained_head += int(head_tokens)

    def end_step(self, **figures) -> dict:
        now = time.perf_counter()
        self.steps.append({"step_s": now - self.last_end, "trained_tokens": self.trained_body,
                           "trained_response_tokens": self.trained_head, **figures})
        self.last_end, self.trained_body, self.trained_head = now, 0, 0
        return self.steps[-1]


RECORDER = Recorder()


def _make_step_recorder():
    import lightning as L
    import torch

    class StepRecorder(L.Callback):
        """Lightning callback of the ``ours`` runs (``callbacks.bench`` in the composed config)."""

        def on_train_start(self, trainer, pl_module):
            RECORDER.at_load(pl_module.policy)
            updater = pl_module.updater
            score = updater.score

            def counting_score(batch, *a, **kw):
                if torch.is_grad_enabled():  # a forward of the update (no-grad scoring is not counted)
                    RECORDER.count(batch.prefix_mask.sum() + batch.response_mask.sum(), batch.response_mask.sum())
                return score(batch, *a, **kw)

            updater.score = counting_score

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            m = trainer.callback_metrics
            rows = batch["prompt_ids"].shape[0] * pl_module.rollout_cfg.group_size
            RECORDER.end_step(
                rollout_s=float(m["train/time/rollout_s"]), update_s=float(m["train/time/update_s"]),
                gen_tokens=round(float(m["train/response_len_mean"]) * rows), reward_mean=float(m["train/reward_mean"]),
            )

    return StepRecorder


# ---------------------------------------------------------------------------------- workers
def run_ours(args, objective: str, run_dir: Path) -> dict:
    from prerl.train import train

    cfg = compose_cfg(args, objective, run_dir)
    summary = train(cfg)
    if summary["status"] != "completed":
        raise RuntimeError(f"ours ({objective}) ended {summary['status']}: {summary.get('error')}")
    update = cfg.module["update"]
    settings = {"objective": objective, "logprob_chunk_tokens": update.logprob_chunk_tokens,
                "skip_zero_advantage": update.skip_zero_advantage}
    return {"shape": shape_of(cfg), "settings": settings}


def _prompt_batches(cfg, spec, tokenizer, steps: int) -> tuple[list[str], list[str]]:
    """The prompts this framework's data module yields for ``steps`` batches, in its order, as the
    exact text of their token ids (checked to re-tokenise to the same ids, as TRL tokenises them),
    and their problems as JSON (for the reward)."""
    import hydra

    template_kwargs = {**(cfg.data.get("chat_template_kwargs") or {}), **spec.chat_template_kwargs}
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, chat_template_kwargs=template_kwargs)
    dm.setup("fit")
    texts, problems, epoch = [], [], 0
    while len(texts) < steps * dm.batch_size:
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(epoch)  # as Lightning does at every epoch
        for batch in loader:
            for ids, mask, problem in zip(batch["prompt_ids"], batch["prompt_mask"], batch["problems"]):
                ids = ids[mask.bool()].tolist()
                text = tokenizer.decode(ids, skip_special_tokens=False)
                if list(tokenizer(text=[text])["input_ids"][0]) != ids:
                    raise ValueError(f"prompt of {problem.get('id')!r} does not re-tokenise to the same ids: {text!r}")
                serialised = json.dumps(problem)
                if json.loads(serialised) != problem:
                    raise ValueError(f"problem {problem.get('id')!r} does not survive a JSON round trip")
                texts.append(text)
                problems.append(serialised)
            if len(texts) >= steps * dm.batch_size:
                break
        epoch += 1
    return texts, problems


def trl_config(cfg, args, out_dir: Path):
    """GRPOConfig equal to the composed config (raises on settings TRL's GRPO cannot express)."""
    from trl import GRPOConfig

    obj, upd, roll, opt = cfg.objective, cfg.module["update"], cfg.module.rollout, cfg.module.optimizer
    unsupported = {
        "objective": obj._target_ != "prerl.objectives.ConditionalRL" or obj.advantage != "grpo",
        "objective.loss_agg (token-mean = dapo)": obj.loss_agg != "token-mean",
        "objective.kl_coef / entropy_coef": bool(obj.kl_coef) or bool(obj.entropy_coef),
        "objective.sample_filter": obj.sample_filter != "all",
        "module.update.epochs / mini_batches": upd.epochs != 1 or upd.mini_batches != 1,
        "module.update.max_tokens_per_micro_batch": upd.max_tokens_per_micro_batch is not None,
        "module.lr_warmup_steps": bool(cfg.module.lr_warmup_steps),
        "module.rollout.generation_batch_size": roll.generation_batch_size is not None,
        "module.rollout.engine": roll.engine != "hf",
        "optimizer": opt._target_ != "torch.optim.AdamW",
    }
    if any(unsupported.values()):
        raise ValueError(f"no TRL equivalent for: {[k for k, bad in unsupported.items() if bad]}")
    rows = cfg.data.batch_size * roll.group_size
    micro = int(upd.micro_batch_size)
    if rows % micro:
        raise ValueError(f"{rows} responses per step do not split into micro-batches of {micro}")
    accumulation = rows // micro
    return GRPOConfig(
        output_dir=str(out_dir), report_to="none", logging_steps=1, save_strategy="no", eval_strategy="no",
        disable_tqdm=True, seed=cfg.seed, max_steps=args.steps, dataloader_num_workers=0,
        use_cpu=args.device == "cpu", bf16=False, fp16=False, gradient_checkpointing=False,
        # batch: one generation of B x G responses and ONE optimizer step per batch, in micro-batches
        per_device_train_batch_size=micro, gradient_accumulation_steps=accumulation,
        steps_per_generation=accumulation, num_iterations=1, num_generations=int(roll.group_size),
        shuffle_dataset=False,  # the dataset is already in this framework's order
        # sampling
        max_completion_length=int(roll.max_new_tokens), temperature=float(roll.temperature),
        top_p=float(roll.top_p), top_k=int(roll.top_k), min_p=None, repetition_penalty=1.0,
        generation_kwargs={"top_k": int(roll.top_k), "top_p": float(roll.top_p),
                           "temperature": float(roll.temperature)},  # no default top-k from elsewhere
        # loss
        loss_type="dapo", beta=0.0, scale_rewards="group", epsilon=float(obj.clip_low),
        epsilon_high=float(obj.clip_high), importance_sampling_level="token", mask_truncated_completions=False,
        disable_dropout=bool(cfg.module.disable_dropout),
        # optimisation (the optimizer itself is built from cfg.module.optimizer and passed in)
        learning_rate=float(opt.lr), weight_decay=float(opt.weight_decay), adam_beta1=float(opt.betas[0]),
        adam_beta2=float(opt.betas[1]), max_grad_norm=float(upd.max_grad_norm), lr_scheduler_type="constant",
        warmup_steps=0, log_completions=False,
    )


def run_trl(args, run_dir: Path) -> dict:
    import hydra
    import torch
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from prerl.rewards import build_reward

    cfg = compose_cfg(args, "grpo", run_dir)
    spec = hydra.utils.instantiate(cfg.model)
    tokenizer = spec.build_tokenizer()
    texts, problems = _prompt_batches(cfg, spec, tokenizer, args.steps)
    dataset = Dataset.from_dict({"prompt": texts, "problem_json": problems})
    reward = build_reward(cfg.reward)
    step_rewards: list[float] = []

    def prerl_reward(prompts, completions, problem_json, **kwargs):
        responses = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        values = [float(r) for r in reward(responses, [json.loads(p) for p in problem_json]).rewards]
        step_rewards.extend(values)
        return values

    model = spec.build_model().train()
    if args.device == "cuda":
        model = model.cuda()
    optimizer = hydra.utils.instantiate(cfg.module.optimizer)(params=[p for p in model.parameters() if p.requires_grad])
    config = trl_config(cfg, args, run_dir / "trl")
    timing = {"rollout_s": 0.0, "gen_tokens": 0}

    class StepEnd(TrainerCallback):
        def on_step_end(self, targs, state, control, **kwargs):
            step = RECORDER.end_step(
                rollout_s=timing["rollout_s"], gen_tokens=timing["gen_tokens"],
                reward_mean=sum(step_rewards) / max(len(step_rewards), 1),
            )
            step["update_s"] = step["step_s"] - step["rollout_s"]  # the rest of the step
            timing.update(rollout_s=0.0, gen_tokens=0)
            step_rewards.clear()

    trainer = GRPOTrainer(
        model=model, reward_funcs=prerl_reward, args=config, train_dataset=dataset, processing_class=tokenizer,
        optimizers=(optimizer, None), callbacks=[StepEnd()],
    )
    generate_and_score = trainer._generate_and_score_completions
    logps = trainer._get_per_token_logps_and_entropies

    def timed_generate_and_score(inputs):
        started = time.perf_counter()
        out = generate_and_score(inputs)
        timing["rollout_s"] += time.perf_counter() - started
        timing["gen_tokens"] += int(out["completion_mask"].sum())
        return out

    def counting_logps(model, input_ids, attention_mask, logits_to_keep, *a, **kw):
        if torch.is_grad_enabled():
            RECORDER.count(attention_mask.sum(), attention_mask[:, -logits_to_keep:].sum())
        return logps(model, input_ids, attention_mask, logits_to_keep, *a, **kw)

    trainer._generate_and_score_completions = timed_generate_and_score
    trainer._get_per_token_logps_and_entropies = counting_logps
    gen = trainer.generation_config
    RECORDER.at_load(model)
    trainer.train()
    if trainer.state.global_step != args.steps:
        raise RuntimeError(f"TRL made {trainer.state.global_step} optimizer steps, expected {args.steps}")
    return {"shape": shape_of(cfg), "settings": {
        "trl_version": trl.__version__,
        "generation": {k: getattr(gen, k, None) for k in ("do_sample", "temperature", "top_p", "top_k", "min_p",
                                                          "repetition_penalty", "max_new_tokens")},
        **{k: getattr(config, k) for k in (
            "per_device_train_batch_size", "gradient_accumulation_steps", "steps_per_generation", "num_iterations",
            "num_generations", "loss_type", "beta", "scale_rewards", "epsilon", "epsilon_high", "bf16",
            "use_cpu", "gradient_checkpointing", "disable_dropout", "learning_rate", "weight_decay",
            "max_grad_norm", "lr_scheduler_type")},
        "optimizer": type(getattr(trainer.optimizer, "optimizer", trainer.optimizer)).__name__,
    }}


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    matmul_before = matmul_gflops(args.device)
    run_dir = Path(args._run_dir)
    if args._worker == "trl_grpo":
        info = run_trl(args, run_dir)
    else:
        globals()["StepRecorder"] = _make_step_recorder()
        info = run_ours(args, SYSTEMS[args._worker][1], run_dir)
    matmul_after = matmul_gflops(args.device)
    matmul = max(matmul_before, matmul_after)  # the peak: contention only ever lowers a measurement
    body, head = RECORDER.params
    for step in RECORDER.steps:  # 6 x params x tokens: forward 2, backward 4 FLOPs per parameter and token
        flops = 6 * (body * step["trained_tokens"] + head * step["trained_response_tokens"])
        step["update_gflops"] = flops / max(step["update_s"], 1e-9) / 1e9
        step["update_frac_of_peak"] = step["update_gflops"] / matmul
        step["s_per_1k_tokens"] = step["step_s"] / max(step["gen_tokens"], 1) * 1000
        if args._worker != "trl_grpo":
            step["other_s"] = step["step_s"] - step["rollout_s"] - step["update_s"]
    peak, cuda_peak = peak_rss_mib(), cuda_mib(peak=True)
    result = {
        "system": args._worker, "steps": RECORDER.steps, "matmul_gflops": matmul,
        "matmul_gflops_before": matmul_before, "matmul_gflops_after": matmul_after, "threads": torch.get_num_threads(),
        "params_body": body, "params_head": head, "peak_rss_mib": peak, "rss_at_load_mib": RECORDER.rss_at_load,
        "peak_above_load_mib": peak - RECORDER.rss_at_load, "cuda_peak_mib": cuda_peak,
        "cuda_peak_above_load_mib": None if cuda_peak is None else cuda_peak - RECORDER.cuda_at_load, **info,
    }
    Path(args._out).write_text(json.dumps(result, indent=1, default=str))


# ---------------------------------------------------------------------------------- parent
def spread(values: list[float]) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    for system, results in runs.items():
        steps = [s for r in results for s in r["steps"][1:]]  # step 0 of each run: warm-up
        figures = {key: spread([s.get(key) for s in steps]) for key, _, _ in STEP_FIGURES}
        figures.update({key: spread([r.get(key) for r in results]) for key, _, _ in RUN_FIGURES})
        out[system] = figures
    return out


def targets(summary: dict) -> dict:
    out = {}
    for key, label, num, den, figure, target in TARGETS:
        a, b = (summary.get(s, {}).get(figure) for s in (num, den))
        ratio = a["median"] / b["median"] if a and b and b["median"] else None
        out[key] = {"label": label, "ratio": ratio, "target": target,
                    "met": None if ratio is None else ratio <= target}
    return out


def fmt(stat: dict | None, pattern: str) -> str:
    if stat is None:
        return "-"
    text = pattern.format(stat["median"])
    if stat["n"] > 1:
        text += f" ({pattern.format(stat['min'])}-{pattern.format(stat['max'])})"
    return text


def first_rollout_check(runs: dict) -> dict | None:
    """Step 0 of the first runs: with the same seed, weights and prompts both systems sample the
    same responses (their RNG use differs afterwards), so equal token counts and rewards are a
    check that prompts, sampling settings and reward match."""
    if "ours_grpo" not in runs or "trl_grpo" not in runs:
        return None
    ours, theirs = runs["ours_grpo"][0]["steps"][0], runs["trl_grpo"][0]["steps"][0]
    check = {"ours_gen_tokens": ours["gen_tokens"], "trl_gen_tokens": theirs["gen_tokens"],
             "ours_reward_mean": ours["reward_mean"], "trl_reward_mean": theirs["reward_mean"]}
    check["identical"] = check["ours_gen_tokens"] == check["trl_gen_tokens"] and abs(
        check["ours_reward_mean"] - check["trl_reward_mean"]) < 1e-6
    return check


def report(args, runs: dict, summary: dict, goals: dict, wall: float) -> str:
    systems = list(summary)
    first = runs[systems[0]][0]
    shape = first["shape"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    lines = [
        f"GRPO step: this framework vs TRL GRPOTrainer (+ this framework's NSR-PreRL step); commit {commit or '?'}",
        f"model {args.model} ({first['params_body']:,} non-embedding + {first['params_head']:,} LM-head parameters), "
        f"{args.device}, {args.threads} torch thread(s), {shape['prompts']} prompts x {shape['group_size']} responses "
        f"of <= {shape['max_new_tokens']} new tokens, micro-batches of {shape['micro_batch_size']}, {shape['dtype']}; "
        f"experiment=dsrl_smollm2_cpu{' ' + ' '.join(args.override) if args.override else ''}, reward={args.reward}",
        f"{args.steps} steps x {args.repeats} repeat(s) per system, alternating; step 0 of each run excluded; "
        f"median (min-max); wall time {wall:.0f} s",
    ]
    if "trl_grpo" in runs:
        s = runs["trl_grpo"][0]["settings"]
        lines.append(f"TRL {s['trl_version']}: loss {s['loss_type']}, beta {s['beta']}, "
                     f"{s['per_device_train_batch_size']} x {s['gradient_accumulation_steps']} micro-batches per step, "
                     f"sampling {s['generation']}")
    width = 28
    col = max(24, *(len(SYSTEMS[s][0]) + 2 for s in systems))
    lines.append("")
    lines.append(f"{'':<{width}}" + "".join(f"{SYSTEMS[s][0]:>{col}}" for s in systems))
    for key, label, pattern in STEP_FIGURES + RUN_FIGURES:
        cells = [fmt(summary[s][key], pattern) for s in systems]
        if key.startswith("cuda") and all(c == "-" for c in cells):
            continue
        lines.append(f"{label:<{width}}" + "".join(f"{c:>{col}}" for c in cells))
    lines.append("")
    lines.append("targets (ratios of medians):")
    for goal in goals.values():
        if goal["ratio"] is None:
            lines.append(f"  {goal['label']:<36} -  (a system was not run)")
            continue
        verdict = "target met" if goal["met"] else "target missed"
        lines.append(f"  {goal['label']:<36} {goal['ratio']:.3f}  (target <= {goal['target']}): {verdict}")
    check = first_rollout_check(runs)
    if check:
        lines.append(f"step 0 rollout (same seed, weights and prompts), ours vs TRL: {check['ours_gen_tokens']} vs "
                     f"{check['trl_gen_tokens']} generated tokens, reward mean {check['ours_reward_mean']:.3f} vs "
                     f"{check['trl_reward_mean']:.3f}: {'identical' if check['identical'] else 'different'}")
    rates = [r[k] for rs in runs.values() for r in rs for k in ("matmul_gflops_before", "matmul_gflops_after")]
    if max(rates) > 1.25 * min(rates):
        lines.append(f"WARNING: the matmul rate varied {min(rates):.0f}-{max(rates):.0f} GFLOP/s between measurements "
                     "(before and after each run): the machine was not quiet, so timings are not comparable")
    lines.append("update GFLOP/s is an estimate (6 x params x trained tokens / update time); every other figure is measured.")
    return "\n".join(lines)


def run_worker(args, system: str, repeat: int, tmp: Path) -> dict:
    out = tmp / f"{system}_{repeat}.json"
    run_dir = tmp / f"{system}_{repeat}"
    run_dir.mkdir()
    argv = [sys.executable, str(Path(__file__).resolve()), "--model", args.model, "--steps", str(args.steps),
            "--threads", str(args.threads), "--device", args.device, "--reward", args.reward, "--seed", str(args.seed),
            "--_worker", system, "--_out", str(out), "--_run-dir", str(run_dir)]
    for item in args.override:
        argv += ["--override", item]
    threads = str(args.threads)
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PRERL_ROOT=str(ROOT))
    log = tmp / f"{system}_{repeat}.log"
    started = time.perf_counter()
    with log.open("w") as handle:
        proc = subprocess.run(argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=args.timeout)
    if proc.returncode != 0 or not out.is_file():
        tail = log.read_text()[-4000:]
        raise SystemExit(f"{system} (repeat {repeat}) failed with exit code {proc.returncode}; its output ends:\n{tail}")
    print(f"  {SYSTEMS[system][0]}, repeat {repeat + 1}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    return json.loads(out.read_text())


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2",
                        help="a model config (configs/model/): same weights in both systems")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is a warm-up)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per system, alternating between systems")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in every run")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--reward", default="default", help="a reward config (configs/reward/); default: the main job's")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--override", action="append", default=[],
                        help="a Hydra override applied to every system (TRL's settings follow it)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path, help="also write every figure (and the raw per-step records) here")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--_worker", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--_out", help=argparse.SUPPRESS)
    parser.add_argument("--_run-dir", dest="_run_dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 0 is a warm-up)")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args._worker:
        worker(args)
        return {}
    started = time.perf_counter()
    runs: dict[str, list[dict]] = {s: [] for s in args.systems}
    with tempfile.TemporaryDirectory(prefix="grpo_vs_trl_") as tmp:
        for repeat in range(args.repeats):
            for system in args.systems:
                runs[system].append(run_worker(args, system, repeat, Path(tmp)))
    summary = summarise(runs)
    goals = targets(summary)
    print(report(args, runs, summary, goals, time.perf_counter() - started), flush=True)
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_")},
              "summary": summary, "targets": goals, "first_rollout_check": first_rollout_check(runs), "runs": runs}
    if args.json:
        args.json.write_text(json.dumps(result, indent=1, default=str))
    return result


if __name__ == "__main__":
    main()
