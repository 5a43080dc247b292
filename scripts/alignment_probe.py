#!/usr/bin/env python
"""Gradient alignment of log P(y) and log P(y|x) for the base model or a checkpoint (paper Fig. 2).

Samples ``--samples`` responses for each of the first ``--prompts`` prompts of the data's
validation split (the training split when there is none) with the model, at the training
rollout's settings (``module.rollout``: temperature, top-p, top-k, max_new_tokens), rewards them,
and computes per pair the inner product and the cosine of g_m = grad log P(y) and
g_c = grad log P(y|x), and the per-token log-prob gap by conditional entropy and by position
(``prerl.analysis.alignment``; docs/analysis.md, "Gradient alignment"). Writes ``alignment.json``
and the plots ``hist_cosine.png``, ``hist_inner.png`` and ``gap_by_entropy.png`` to ``--out``.

The config is composed as ``python src/train.py`` composes it, with the same overrides:

  python scripts/alignment_probe.py                                   # base SmolLM2-135M, main job's data
  python scripts/alignment_probe.py ckpt_path=logs/dsrl_smollm2_cpu/runs/<run> --prompts 8 --samples 4
  python scripts/alignment_probe.py ckpt_path=last                    # newest checkpoint of the task's runs
  python scripts/alignment_probe.py model=smollm2_lora --params lora  # adapter gradients only
  python scripts/alignment_probe.py --params last:4                   # the last 4 decoder layers only
  python scripts/alignment_probe.py experiment=smoke --out /tmp/probe # the tiny random model: seconds

With ``ckpt_path`` the policy is rebuilt from the checkpoint's own run config and its weights are
loaded (``prerl.export.load_policy``); the data, reward and sampling settings come from the
composed config.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("PRERL_ROOT", str(ROOT))
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, os.getcwd())  # user plug-ins (rewards, data sources) in the working directory

log = logging.getLogger("alignment_probe")


def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=list(overrides))


def load_model(cfg, device: str):
    """(policy, tokenizer, description) of the base model or of ``cfg.ckpt_path``."""
    import hydra

    from prerl.checkpointing import resolve_checkpoint
    from prerl.export import load_policy
    from prerl.models.params import disable_dropout

    runs = Path(cfg.paths.log_dir) / cfg.task_name / "runs"
    ckpt = resolve_checkpoint(cfg.get("ckpt_path"), runs_dir=runs)
    if ckpt is not None:
        policy, tokenizer = load_policy(ckpt)
        what = f"checkpoint {ckpt}"
    else:
        spec = hydra.utils.instantiate(cfg.model)
        tokenizer, policy = spec.build_tokenizer(), spec.build_model()
        what = f"base model {cfg.model._target_}"
    disable_dropout(policy)
    return policy.to(device).eval(), tokenizer, what, ckpt


def sample_pairs(cfg, policy, tokenizer, num_prompts: int, samples: int, seed: int, device: str):
    """Responses for the first ``num_prompts`` validation prompts, rewarded; (ProbePairs, texts, problems)."""
    import hydra
    import torch

    from prerl.analysis.alignment import ProbePairs
    from prerl.rewards import build_reward
    from prerl.rollout import Rollout, decode, eos_ids, generate

    template_kwargs = dict(cfg.data.get("chat_template_kwargs") or {})
    datamodule = hydra.utils.instantiate(cfg.data, tokenizer=tokenizer, chat_template_kwargs=template_kwargs)
    datamodule.setup("validate")
    loader = datamodule.val_dataloader()
    split = "val"
    if not loader:
        loader, split = datamodule.train_dataloader(), "train"
    ro = cfg.module.rollout
    reward = build_reward(cfg.reward)
    eos = eos_ids(getattr(policy, "generation_config", None), tokenizer)
    torch.manual_seed(seed)
    parts, texts, problems, taken = [], [], [], 0
    for batch in loader:
        n = min(num_prompts - taken, batch["prompt_ids"].shape[0])
        prompt_ids, prompt_mask = batch["prompt_ids"][:n].to(device), batch["prompt_mask"][:n].to(device)
        response_ids, response_mask, truncated = generate(
            policy, prompt_ids, prompt_mask, samples, int(ro.max_new_tokens), float(ro.temperature), float(ro.top_p),
            eos, tokenizer.pad_token_id, top_k=int(ro.top_k),
        )
        rep = lambda t: t.repeat_interleave(samples, dim=0)  # noqa: E731
        rows_problems = [p for p in batch["problems"][:n] for _ in range(samples)]
        rows_texts = decode(tokenizer, response_ids, response_mask)
        result = reward(rows_texts, rows_problems)
        rollout = Rollout(
            prompt_ids=rep(prompt_ids), prompt_mask=rep(prompt_mask),
            context_ids=rep(batch["context_ids"][:n].to(device)),
            response_ids=response_ids, response_mask=response_mask, truncated=truncated, texts=rows_texts,
            problems=rows_problems, group_size=samples, rewards=result.rewards.float(),
        )
        parts.append(ProbePairs.from_rollout(rollout))
        texts += rows_texts
        problems += rows_problems
        taken += n
        if taken >= num_prompts:
            break
    pairs = ProbePairs.concat(parts, int(datamodule.pad_token_id or 0))
    return pairs, texts, problems, split


def write_plots(stats: dict, out: Path) -> list[Path]:
    """hist_cosine.png, hist_inner.png, gap_by_entropy.png (the gap by entropy quantile bin over all tokens and
    over the late ones, by fixed entropy bin, by position)."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = stats["per_sample"]
    written = []
    for key, label in (("cosine", "cos(grad log P(y), grad log P(y|x))"), ("inner", "<grad log P(y), grad log P(y|x)>")):
        values = [r[key] for r in rows if r[key] is not None and math.isfinite(r[key])]
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(values, bins=min(30, max(5, len(values) // 2)), color="tab:blue", edgecolor="white")
        ax.axvline(0.0, color="black", lw=0.8)
        s = stats["summary"]
        ax.set_title(f"{label}\nn={s['n']}, mean {s[key + '_mean']:.3g}, median {s[key + '_median']:.3g}, "
                     f"negative {100 * s['frac_negative']:.0f}%", fontsize=9)
        ax.set_xlabel(key)
        ax.set_ylabel("pairs")
        fig.tight_layout()
        path = out / f"hist_{key}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    split = stats.get("gap_by_entropy_split") or {}
    panels = [(stats.get("gap_by_entropy"), "conditional entropy (quantile bins, nats), all tokens"),
              (split.get("late"), f"the same bins, tokens at positions >= {split.get('early_tokens')}"),
              (stats.get("gap_by_entropy_fixed"), "conditional entropy (fixed bins, nats), all tokens"),
              (stats.get("gap_by_position"), "token position in the response")]
    panels = [(t, title) for t, title in panels if t]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False, sharey=True)
    for ax, (rows_of_bins, title) in zip(axes[0], panels):
        table = [r for r in rows_of_bins if r["count"]]
        hi = lambda r: "inf" if math.isinf(r["hi"]) else f"{r['hi']:.3g}"  # noqa: E731
        labels = [f"{r['lo']:.3g}-{hi(r)}\nn={r['count']}" for r in table]
        ax.bar(range(len(table)), [r["mean_gap"] for r in table], color="tab:orange", label="mean gap")
        ax.plot(range(len(table)), [r["mean_abs_gap"] for r in table], "o-", color="tab:gray", label="mean |gap|")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(table)), labels, fontsize=7)
        ax.set_xlabel(title, fontsize=8)
        ax.set_ylabel("log P(y_t|x,y<t) - log P(y_t|c,y<t)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "gap_by_entropy.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*",
                        help="Hydra overrides as for src/train.py (ckpt_path=..., model=..., data=...)")
    parser.add_argument("--prompts", type=int, default=8, help="M prompts of the validation split (default 8)")
    parser.add_argument("--samples", type=int, default=4, help="N responses per prompt (default 4)")
    parser.add_argument("--params", default="auto",
                        help="parameter subset: auto | trainable | lora | last:K | name patterns, comma-separated")
    parser.add_argument("--entropy-bins", type=int, default=5, help="quantile bins of the conditional entropy")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default=None, help="output folder (default: logs/alignment_probe/<date_time>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # The data module describes the training batches it would build; the probe samples from the
    # validation prompts and says so itself. (Restored at the end: main() also runs inside tests.)
    datamodule_log = logging.getLogger("prerl.data.datamodule")
    level = datamodule_log.level
    datamodule_log.setLevel(logging.WARNING)
    try:
        return _probe(args, argv)
    finally:
        datamodule_log.setLevel(level)


def _probe(args, argv: list[str] | None) -> Path:
    """Sample the pairs, compute the alignment statistics, write and print them."""
    import torch

    from prerl.analysis.alignment import alignment_stats
    from prerl.callbacks.alignment import json_safe

    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = compose(args.overrides)
    out = Path(args.out) if args.out else Path(cfg.paths.log_dir) / "alignment_probe" / time.strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    policy, tokenizer, what, ckpt = load_model(cfg, device)
    log.info("policy: %s", what)
    pairs, texts, problems, split = sample_pairs(cfg, policy, tokenizer, args.prompts, args.samples, args.seed, device)
    sampled = time.perf_counter()
    log.info("sampled %d pairs from %d %s prompts in %.1f s", len(pairs), len(pairs) // args.samples, split,
             sampled - started)
    update = cfg.module.get("update") or {}
    stats = alignment_stats(
        policy, pairs, params=args.params, temperature=float(cfg.module.rollout.temperature),
        chunk_tokens=update.get("logprob_chunk_tokens"), entropy_bins=args.entropy_bins, device=device,
    )
    for row, text, problem in zip(stats["per_sample"], texts, problems):
        row["question"], row["gold"], row["response"] = problem.get("question"), problem.get("answer"), text
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "policy": what,
        "ckpt_path": ckpt,
        "overrides": list(args.overrides),
        "split": split,
        "prompts": args.prompts,
        "samples_per_prompt": args.samples,
        "seed": args.seed,
        "device": device,
        "sampling": {k: cfg.module.rollout[k] for k in ("temperature", "top_p", "top_k", "max_new_tokens")},
        "sample_seconds": sampled - started,
        **stats,
    }
    (out / "alignment.json").write_text(json.dumps(json_safe(result), indent=2))
    plots = write_plots(stats, out)
    s = stats["summary"]
    print(f"{len(pairs)} pairs, {stats['params']['numel']:,} parameters ({stats['params']['spec']}): "
          f"inner > 0 for {100 * s['frac_positive']:.1f}% (mean {s['inner_mean']:.4g}, median {s['inner_median']:.4g}), "
          f"cosine mean {s['cosine_mean']:.3f} median {s['cosine_median']:.3f}; {stats['seconds']:.1f} s")
    late = (stats.get("gap_by_entropy_split") or {}).get("late") or [None] * len(stats["gap_by_entropy"])
    first = (stats.get("gap_by_entropy_split") or {}).get("early_tokens")
    for row, tail in zip(stats["gap_by_entropy"], late):
        line = (f"  entropy {row['lo']:.3f}-{row['hi']:.3f}: {row['count']:5d} tokens, mean gap {row['mean_gap']:+.3f}, "
                f"mean |gap| {row['mean_abs_gap']:.3f}")
        if tail is not None and tail["count"]:
            line += f"; positions >= {first}: {tail['count']:5d} tokens, mean gap {tail['mean_gap']:+.3f}"
        print(line)
    for row in stats["gap_by_position"]:
        print(f"  position {row['lo']:.0f}-{row['hi']:.0f}: {row['count']:5d} tokens, mean gap {row['mean_gap']:+.3f}")
    print(f"wrote {out / 'alignment.json'} and {', '.join(p.name for p in plots)}")
    return out


if __name__ == "__main__":
    main()
