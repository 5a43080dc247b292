#!/usr/bin/env python
"""Do two rollout engines sample the same distribution on a study's own task? Many samples of the
same prompts from the same weights, one engine after the other, then per-prompt paired differences::

    .venv-vllm/bin/python benchmarks/engine_agreement.py                     # hf vs vllm, SmolLM2 (base model)
    python benchmarks/engine_agreement.py --engines hf,hf-refill --prompts 8 --samples 4   # .venv: hf modes

What runs: ``experiment=study_miniature`` composed as ``src/train.py`` composes it (the long study's
task: reasoning-gym arithmetic with +, - and x, its system prompt, 64 new tokens, T = 1.0, its
reward), the first ``--prompts`` training prompts, ``--samples`` responses each per engine, from
the same float32 weights (the base model). Per engine: accuracy (the study's
reward), mean response length, the share truncated at the limit, the mean per-token log-prob of
the responses under the policy (scored by the trainer's forward). Per pair: the difference (B - A)
of the per-prompt means, with a 95% bootstrap interval over prompts (``paired_bootstrap_ci``);
"agree" when every interval contains 0. Sampling seeds differ by engine (each from ``--seed``), so
two samplings of one engine also differ by chance: ``--engines hf,hf`` shows that noise.

Output: a table on stdout and ``--out`` (JSON). Slow on CPU: about (prompts x samples x ~35
tokens) / (~90 tokens/s for hf, ~180 for vLLM) (docs/engines.md), so ~10 minutes at the defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("PRERL_ROOT", str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

ENGINES = {"hf": ("hf", {}), "hf-refill": ("hf", {"refill": True}), "vllm": ("vllm", {"enforce_eager": True, "max_model_len": 512})}


def setup(overrides: list[str], n_prompts: int):
    """(policy, tokenizer, batch of the first prompts, reward, rollout settings) of the composed config."""
    import hydra.utils

    from prerl.rewards.plugin import build_reward
    from tools.estimate_config import compose_config

    cfg = compose_config(overrides)
    spec = hydra.utils.instantiate(cfg.model)
    tokenizer = spec.build_tokenizer()
    policy = spec.build_model()
    dm = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, batch_size=n_prompts)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    return policy.eval(), tokenizer, batch, build_reward(cfg.reward), cfg.module.rollout


def sample(engine, policy, tokenizer, batch, reward, rollout, samples: int) -> dict[str, np.ndarray]:
    """(prompts, samples) arrays: right, length, truncated, mean token log-prob; and seconds."""
    from prerl.scoring import score_responses

    ids, mask = batch["prompt_ids"], batch["prompt_mask"]
    started = time.perf_counter()
    out = engine.generate(ids, mask, samples, rollout.max_new_tokens, rollout.temperature, rollout.top_p,
                          rollout.top_k, None)
    seconds = time.perf_counter() - started
    rep = lambda t: t.repeat_interleave(samples, dim=0)  # noqa: E731
    with torch.no_grad():
        logprobs, _ = score_responses(policy, rep(ids), rep(mask), out.response_ids, out.response_mask)
    lengths = out.response_mask.sum(dim=1).float()
    texts = [tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(out.response_ids, out.response_mask)]
    problems = [p for p in batch["problems"] for _ in range(samples)]
    right = reward(texts, problems).rewards.float()
    shape = (len(ids), samples)
    return {"right": right.view(shape).numpy(), "length": lengths.view(shape).numpy(),
            "truncated": out.truncated.float().view(shape).numpy(),
            "logprob": (logprobs.sum(dim=1) / lengths.clamp(min=1)).view(shape).numpy(), "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    from prerl.study.stats import paired_bootstrap_ci

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="hf,vllm", help=f"comma-separated, compared with the first: {sorted(ENGINES)}")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--overrides", nargs="*", default=["experiment=study_miniature"], help="Hydra overrides of the task")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "engine_agreement.json", help="JSON of the figures")
    args = ap.parse_args(argv)
    names = args.engines.split(",")
    unknown = [n for n in names if n not in ENGINES]
    if unknown or len(names) < 2:
        ap.error(f"--engines needs two or more of {sorted(ENGINES)}; got {args.engines!r}")
    torch.set_num_threads(args.threads)
    from prerl.engines import build_engine

    policy, tokenizer, batch, reward, rollout = setup(args.overrides, args.prompts)
    results = {}
    for k, name in enumerate(names):
        kind, options = ENGINES[name]
        engine = build_engine(kind, policy=lambda: policy, tokenizer=tokenizer, **options)
        torch.set_num_threads(args.threads)  # vLLM's start-up changes it (prerl.engines.vllm restores it)
        torch.manual_seed(args.seed + k)
        results[f"{k}:{name}"] = sample(engine, policy, tokenizer, batch, reward, rollout, args.samples)
        del engine
    keys = list(results)
    print(f"{args.prompts} prompts x {args.samples} samples, T = {rollout.temperature}, up to {rollout.max_new_tokens} tokens\n")
    print("| engine | accuracy | length | truncated | token log-prob | seconds |")
    print("|---|---|---|---|---|---|")
    for key, r in results.items():
        print(f"| {key} | {r['right'].mean():.3f} | {r['length'].mean():.2f} | {r['truncated'].mean():.3f} | "
              f"{r['logprob'].mean():.3f} | {r['seconds']:.1f} |")
    report = {"prompts": args.prompts, "samples": args.samples, "engines": keys, "overrides": args.overrides,
              "means": {k: {m: float(np.mean(v)) for m, v in r.items()} for k, r in results.items()}, "pairs": []}
    print("\n| B - A (per-prompt means) | accuracy | length | truncated | token log-prob |")
    print("|---|---|---|---|---|")
    for key in keys[1:]:
        a, b = results[keys[0]], results[key]
        row = {"a": keys[0], "b": key}
        cells = []
        for metric in ("right", "length", "truncated", "logprob"):
            diff, lo, hi = paired_bootstrap_ci(b[metric].mean(axis=1), a[metric].mean(axis=1))
            row[metric] = {"diff": diff, "lo": lo, "hi": hi, "agree": bool(lo <= 0 <= hi)}
            cells.append(f"{diff:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        report["pairs"].append(row)
        print(f"| {key} - {keys[0]} | " + " | ".join(cells) + " |")
    agree = all(p[m]["agree"] for p in report["pairs"] for m in ("right", "length", "truncated", "logprob"))
    print("\nagree: every interval contains 0" if agree else "\nDIFFER: an interval excludes 0")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**report, "agree": agree}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
