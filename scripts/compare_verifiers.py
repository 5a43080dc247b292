"""Score an evaluation's saved responses with two rewards: how much of a result depends on the verifier.

    python scripts/compare_verifiers.py logs/eval/runs/<run> --rewards default,math_string
    python scripts/compare_verifiers.py <run> --rewards saved,math_string --sets aime --show 20 --width 600

The run is an eval run folder (``python src/eval.py``): its per-problem records, problems/<set>.jsonl,
hold every response and its gold. Each reward is a name in configs/reward/ (default, math_string, boxed,
...), a YAML file of that form, or ``saved``: the rewards the evaluation itself recorded. Per set it
prints the agreement table (both 1, both 0, only A, only B) and avg@k under each reward, then the
responses they disagree on (their end, where the answer is). A response counts as correct when its
reward is > 0.5, as in training and evaluation.

Reasoning-gym sets are skipped: their scorer needs the generator's entry, which the records do not
keep. Training runs keep no rollouts on disk (TensorBoard's text tab has a few responses every N
updates, hard-wrapped, with the gold cut at 60 characters): evaluate a training run's checkpoint with
``python src/eval.py ckpt_path=<training run>`` and compare that evaluation.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from omegaconf import OmegaConf  # noqa: E402

from prerl.evaluation.records import read_records  # noqa: E402
from prerl.rewards import build_reward  # noqa: E402

REWARD_CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "reward"
SAVED = "saved"


@dataclass
class Comparison:
    """Counts of one eval set (or all): both correct, both wrong, only A, only B; and the disagreements."""

    both_1: int = 0
    both_0: int = 0
    only_a: int = 0
    only_b: int = 0
    disagreements: list[dict] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.both_1 + self.both_0 + self.only_a + self.only_b

    def add(self, other: "Comparison") -> None:
        self.both_1 += other.both_1
        self.both_0 += other.both_0
        self.only_a += other.only_a
        self.only_b += other.only_b
        self.disagreements += other.disagreements


def load_reward(name: str):
    """A reward config's name or YAML path -> the built reward; ``saved`` -> None (the recorded rewards)."""
    if name == SAVED:
        return None
    path = Path(name) if name.endswith((".yaml", ".yml")) else REWARD_CONFIGS / f"{name}.yaml"
    if not path.is_file():
        names = sorted(p.stem for p in REWARD_CONFIGS.glob("*.yaml"))
        sys.exit(f"--rewards: {name!r} is neither a config in configs/reward ({', '.join(names)}), a YAML file, "
                 f"nor {SAVED!r}")
    return build_reward(OmegaConf.load(path))


def set_verifiers(run: Path) -> dict[str, str]:
    """Eval set name -> the verifier of its problems, from the run's eval_settings.json (math when unknown)."""
    settings = run / "eval_settings.json"
    if not settings.is_file():
        return {}
    out = {}
    for entry in json.loads(settings.read_text()).get("sets", []):
        spec = entry.get("spec", {})
        if spec.get("kind") == "rg" or "ReasoningGymSource" in json.dumps(spec):
            out[entry["name"]] = "reasoning_gym"
        else:
            out[entry["name"]] = spec.get("verifier", "math")
    return out


def record_files(run: Path) -> list[Path]:
    files = sorted((run / "problems").glob("*.jsonl"))
    if files:
        return files
    if (run / "tensorboard").is_dir() or (run / "checkpoints").is_dir():
        sys.exit(f"{run} is a training run: training keeps no rollouts on disk (TensorBoard's text tab has a few "
                 "responses every N updates, wrapped, golds cut at 60 characters). Evaluate its checkpoint with "
                 f"`python src/eval.py ckpt_path={run}` and compare that evaluation's run folder")
    sys.exit(f"{run}: no problems/*.jsonl (is it an eval run folder written by src/eval.py?)")


def score(reward, record: dict, verifier: str) -> tuple[list[float], list[str | None]]:
    """The rewards and extracted answers of one record's responses (the recorded ones for ``saved``)."""
    if reward is None:
        return [float(r) for r in record["rewards"]], list(record["extracted"])
    problem = {"id": record["id"], "question": record["question"], "answer": record["answer"],
               "verifier": verifier, "meta": {}}
    result = reward(record["responses"], [problem] * len(record["responses"]))
    return result.rewards.tolist(), list(result.extracted or [None] * len(record["responses"]))


def compare_set(records: list[dict], reward_a, reward_b, verifier: str) -> tuple[Comparison, list[float], list[float]]:
    """The comparison of one set, and each reward's fraction of correct responses per problem."""
    comparison, avg_a, avg_b = Comparison(), [], []
    for record in records:
        ra, ea = score(reward_a, record, verifier)
        rb, eb = score(reward_b, record, verifier)
        a_ok, b_ok = [r > 0.5 for r in ra], [r > 0.5 for r in rb]
        avg_a.append(sum(a_ok) / max(len(a_ok), 1))
        avg_b.append(sum(b_ok) / max(len(b_ok), 1))
        for i, (a, b) in enumerate(zip(a_ok, b_ok)):
            if a and b:
                comparison.both_1 += 1
            elif not a and not b:
                comparison.both_0 += 1
            else:
                comparison.only_a += a
                comparison.only_b += b
                comparison.disagreements.append({
                    "id": record["id"], "sample": i, "gold": record["answer"], "response": record["responses"][i],
                    "a": (ra[i], ea[i]), "b": (rb[i], eb[i])})
    return comparison, avg_a, avg_b


def tail(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-width:]


def main(argv: list[str] | None = None) -> dict[str, Comparison]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="an eval run folder (with problems/*.jsonl)")
    parser.add_argument("--rewards", default="default,math_string",
                        help="A,B: two reward config names (configs/reward), YAML files, or 'saved' (default: %(default)s)")
    parser.add_argument("--sets", default=None, help="comma-separated eval sets to compare (default: all)")
    parser.add_argument("--show", type=int, default=10, help="disagreeing responses to print (default: %(default)s)")
    parser.add_argument("--width", type=int, default=400,
                        help="characters shown of each response, from its end (default: %(default)s)")
    args = parser.parse_args(argv)
    names = args.rewards.split(",")
    if len(names) != 2 or not all(names):
        sys.exit(f"--rewards={args.rewards!r}: give exactly two, comma-separated, e.g. default,math_string")
    name_a, name_b = names
    reward_a, reward_b = load_reward(name_a), load_reward(name_b)
    verifiers = set_verifiers(args.run)
    files = record_files(args.run)
    wanted = set(args.sets.split(",")) if args.sets else None
    results: dict[str, Comparison] = {}
    rows = []
    for file in files:
        records, _ = read_records(file)
        if not records:
            continue
        name = records[0].get("set", file.stem)
        if wanted is not None and name not in wanted:
            continue
        verifier = verifiers.get(name, "math")
        if verifier == "reasoning_gym":
            print(f"{name}: skipped (reasoning-gym problems: their scorer needs the generator's entry, not kept "
                  "in the records)")
            continue
        comparison, avg_a, avg_b = compare_set(records, reward_a, reward_b, verifier)
        results[name] = comparison
        rows.append((name, len(records), comparison, sum(avg_a) / len(avg_a), sum(avg_b) / len(avg_b)))
    if wanted is not None and wanted - set(results):
        sys.exit(f"--sets: {sorted(wanted - set(results))} not in {args.run / 'problems'} (or reasoning-gym)")
    if not results:
        sys.exit(f"{args.run}: no records to compare")
    everything = Comparison()
    for comparison in results.values():
        everything.add(comparison)

    print(f"{args.run}\nA = {name_a}, B = {name_b} (correct: reward > 0.5)\n")
    head = ["set", "problems", "responses", "both 1", "both 0", f"only {name_a}", f"only {name_b}", "agree",
            f"avg {name_a}", f"avg {name_b}"]
    table = [[name, str(n), str(c.total), str(c.both_1), str(c.both_0), str(c.only_a), str(c.only_b),
              f"{(c.both_1 + c.both_0) / c.total:.1%}", f"{a:.4f}", f"{b:.4f}"] for name, n, c, a, b in rows]
    if len(rows) > 1:
        c = everything
        table.append(["all", str(sum(r[1] for r in rows)), str(c.total), str(c.both_1), str(c.both_0), str(c.only_a),
                      str(c.only_b), f"{(c.both_1 + c.both_0) / c.total:.1%}", "", ""])
    widths = [max(len(row[i]) for row in [head, *table]) for i in range(len(head))]
    for row in [head, *table]:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))

    shown = everything.disagreements[:max(args.show, 0)]
    print(f"\n{len(everything.disagreements)} responses scored differently"
          + (f"; the first {len(shown)}:" if shown else ""))
    for d in shown:
        (ra, ea), (rb, eb) = d["a"], d["b"]
        print(f"\n--- {d['id']} sample {d['sample']}: gold {d['gold']!r}; {name_a} {ra:g} (extracted {ea!r}), "
              f"{name_b} {rb:g} (extracted {eb!r})")
        print(tail(d["response"], args.width))
    return results


if __name__ == "__main__":
    main()
