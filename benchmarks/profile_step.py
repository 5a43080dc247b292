#!/usr/bin/env python
"""Where a training step's time goes: cProfile over a few steps of ``prerl.train.train``.

    python benchmarks/profile_step.py                          # 3 GRPO steps of the main job, 2 threads
    python benchmarks/profile_step.py objective=nsr_prerl --steps 3 --threads 2 --dump /tmp/nsr.pstats
    python benchmarks/profile_step.py experiment=smoke --steps 2   # the tiny model: seconds

Validation, checkpoints, loggers and callbacks are off. Prints the cumulative seconds of the
step's parts (sampling, scoring forwards, backward, optimizer step, clipping, rewards, decoding,
chat templates) and the 30 most expensive functions; ``--dump`` keeps the raw profile for
``python -m pstats`` or snakeviz.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

# (label, file suffix, function name): the step's parts, matched in the profile
PARTS = [
    ("training_step (all)", "prerl/module.py", "training_step"),
    ("sampling: generate", "transformers/generation/utils.py", "_sample"),
    ("update: all", "prerl/updates.py", "_optimizer_update"),
    ("update: scoring forwards", "prerl/scoring.py", "score_responses"),
    ("update: backward", "torch/autograd/graph.py", "_engine_run_backward"),
    ("update: optimizer step", "lightning/pytorch/core/optimizer.py", "step"),
    ("update: gradient clipping", "prerl/updates.py", "_clip_gradients"),
    ("rewards", "prerl/rewards/plugin.py", "__call__"),
    ("decode", "prerl/rollout.py", "decode"),
    ("chat templates", "transformers/tokenization_utils_base.py", "apply_chat_template"),
]


def parts(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Cumulative seconds of every part found in the profile."""
    out = []
    for label, suffix, name in PARTS:
        total = sum(v[3] for (file, _, fn), v in stats.stats.items() if file.endswith(suffix) and fn == name)
        out.append((label, total))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="Hydra overrides as for src/train.py (default: objective=grpo)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dump", default=None, help="write the raw profile here")
    args = ap.parse_args(argv)

    import torch
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from prerl.train import train

    torch.set_num_threads(args.threads)
    overrides = args.overrides or ["objective=grpo"]
    out = tempfile.mkdtemp(prefix="prerl_profile_")
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[
            f"trainer.max_steps={args.steps}", "validate_before=false", "validate_after=false", "callbacks=none",
            "logger=csv", "module.cross_space_diagnostics_every_n_steps=0", *overrides])
    with open_dict(cfg):
        cfg.paths.output_dir = out
    profile = cProfile.Profile()
    profile.enable()
    train(cfg)
    profile.disable()
    if args.dump:
        profile.dump_stats(args.dump)
    stats = pstats.Stats(profile)
    print(f"{args.steps} steps, {args.threads} threads, overrides {overrides} (cumulative seconds; parts nest)")
    found = parts(stats)
    whole = found[0][1] or 1.0
    for label, seconds in found:
        print(f"  {label:<28}{seconds:9.2f} s  {100 * seconds / whole:5.1f}%")
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
    print(text.getvalue())


if __name__ == "__main__":
    main()
