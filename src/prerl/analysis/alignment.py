"""Gradient alignment of the two spaces (the paper's Fig. 2; docs/analysis.md, "Gradient alignment").

For a response y sampled after its prompt x, compare the gradients of its two log-probs over the
chosen (trainable) parameters theta:

    g_c = grad_theta log P(y | x)   the response scored after its prompt (post-train space)
    g_m = grad_theta log P(y)       the same tokens after the one-token question-free context c
                                    (pre-train space; positions restart at 0)

Both log-probs are sums over the response's tokens, end token included, exactly as the project's
objectives score them (``prerl.scoring.score_responses`` with the prompt or the context as prefix,
at the sampling temperature). Per sample: the inner product <g_m, g_c>, the cosine and the two
norms; over the set: the fraction of negative inner products, means and medians (paper, Qwen3-4B,
AMC23, 400 rollouts: positive for every rollout, mean +9.23, mean cosine 0.44). From the same two
forward passes, the per-token gap log P(y_t | x, y_<t) - log P(y_t | c, y_<t), binned by the
conditional token entropy and by the token's position in the response (the paper: the two agree on
confident tokens and differ on early and high-entropy ones).

How the per-sample gradients are computed: one forward and one ``torch.autograd.grad`` per sample
and space, batch size 1, no padding. Chosen by measurement against ``torch.func``
(``functional_call`` + ``vmap(grad)`` over chunks of samples; 2-core shared CPU, one thread,
2026-12-01; the figures are these). On the tiny model the two were within the machine's
noise (0.011-0.041 s per pair for the loop, 0.009-0.019 s for vmap). On SmolLM2-135M (all 135M
parameters) the loop took 2.6-3.1 s per pair at +1.3 GB, vmap 3.1 s at +3.0 GB (2 pairs per
chunk) and 4.0 s at +6.0 GB (4 pairs): vmap holds two full gradients per pair of its chunk and
gains nothing on a CPU whose matmuls are already large. vmap also cannot run the model as the
training code calls it: Hugging Face's mask construction branches on tensor values (vmap refuses
it), so it needs a hand-built 4-D additive mask and a separate forward of its own. The loop runs
the training code's own scoring (``score_responses``: peft, the chunked LM head, SDPA).
``torch.autograd.grad`` returns the gradients instead of accumulating them, so no ``.grad`` is
ever written.

Memory: at most two gradients of the chosen subset are alive at once, g_m while g_c is computed
(both kept as the per-parameter tuples autograd returns, which take exactly the memory of one
flattened vector each: nothing is concatenated), plus the activations of one sample's forward.
Bound it for large models with a parameter subset (``select_parameters``): the LoRA adapters,
the last K decoder layers, or name patterns such as ``layers.*.mlp``.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import torch

from prerl.models.params import unwrap_policy
from prerl.scoring import score_responses

__all__ = [
    "DEFAULT_ENTROPY_EDGES",
    "DEFAULT_POSITION_EDGES",
    "ProbePairs",
    "alignment_stats",
    "gradient_alignment",
    "select_parameters",
    "summarize_alignment",
    "token_gap_by_entropy",
    "token_gap_by_position",
]

#: Fixed conditional-entropy bins (nats) reported next to the quantile bins.
DEFAULT_ENTROPY_EDGES: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0, 2.0, 4.0, math.inf)
#: Token-position bins (0 = the response's first token): early tokens get their own bins.
DEFAULT_POSITION_EDGES: tuple[float, ...] = (0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, math.inf)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


# ----------------------------------------------------------------------------- the probe set
@dataclass
class ProbePairs:
    """(x, y) pairs: each row a prompt, its question-free context and one sampled response.

    Attributes:
        prompt_ids, prompt_mask: (N, P) left-padded prompts x.
        context_ids: (N, C) the question-free context c (the data's ``context_ids``).
        response_ids, response_mask: (N, T) right-padded responses, end token included.
        rewards: (N,) float or None.
        ids: problem id of each row, or None.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    context_ids: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    rewards: torch.Tensor | None = None
    ids: list | None = None

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    @classmethod
    def from_rollout(cls, rollout, rows: Sequence[int] | torch.Tensor | None = None) -> "ProbePairs":
        """The rows ``rows`` (default all) of a ``prerl.rollout.Rollout``, copied to the CPU."""
        index = torch.arange(rollout.response_ids.shape[0]) if rows is None else torch.as_tensor(rows).long()
        pick = lambda t: None if t is None else t.detach()[index.to(t.device)].cpu().clone()  # noqa: E731
        problems = getattr(rollout, "problems", None) or []
        return cls(
            prompt_ids=pick(rollout.prompt_ids),
            prompt_mask=pick(rollout.prompt_mask),
            context_ids=pick(rollout.context_ids),
            response_ids=pick(rollout.response_ids),
            response_mask=pick(rollout.response_mask),
            rewards=None if rollout.rewards is None else pick(rollout.rewards).float(),
            ids=[problems[i].get("id") for i in index.tolist()] if problems else None,
        )

    @classmethod
    def concat(cls, parts: Sequence["ProbePairs"], pad_token_id: int = 0) -> "ProbePairs":
        """Stack several sets: prompts re-left-padded, responses re-right-padded to the longest."""
        parts = [p for p in parts if len(p)]
        if not parts:
            raise ValueError("no pairs to concatenate")
        if len(parts) == 1:
            return parts[0]
        width = max(p.prompt_ids.shape[1] for p in parts)
        length = max(p.response_ids.shape[1] for p in parts)
        left = lambda t, v: torch.nn.functional.pad(t, (width - t.shape[1], 0), value=v)  # noqa: E731
        right = lambda t, v: torch.nn.functional.pad(t, (0, length - t.shape[1]), value=v)  # noqa: E731
        has_rewards = all(p.rewards is not None for p in parts)
        has_ids = all(p.ids is not None for p in parts)
        return cls(
            prompt_ids=torch.cat([left(p.prompt_ids, pad_token_id) for p in parts]),
            prompt_mask=torch.cat([left(p.prompt_mask, 0) for p in parts]),
            context_ids=torch.cat([p.context_ids for p in parts]),
            response_ids=torch.cat([right(p.response_ids, pad_token_id) for p in parts]),
            response_mask=torch.cat([right(p.response_mask, 0) for p in parts]),
            rewards=torch.cat([p.rewards for p in parts]) if has_rewards else None,
            ids=[i for p in parts for i in p.ids] if has_ids else None,
        )

    def take(self, n: int) -> "ProbePairs":
        """The first ``n`` rows."""
        return ProbePairs(
            prompt_ids=self.prompt_ids[:n], prompt_mask=self.prompt_mask[:n], context_ids=self.context_ids[:n],
            response_ids=self.response_ids[:n], response_mask=self.response_mask[:n],
            rewards=None if self.rewards is None else self.rewards[:n], ids=None if self.ids is None else self.ids[:n],
        )

    def row(self, i: int, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Row ``i`` without padding: prompt (1, P_i), context (1, C), response (1, T_i) and masks."""
        p = int(self.prompt_mask[i].sum())
        t = int(self.response_mask[i].sum())
        to = lambda x: x.unsqueeze(0).to(device)  # noqa: E731
        prompt = self.prompt_ids[i][self.prompt_mask[i].bool()]
        return {
            "prompt_ids": to(prompt), "prompt_mask": to(torch.ones(p, dtype=torch.long)),
            "context_ids": to(self.context_ids[i]), "context_mask": to(torch.ones_like(self.context_ids[i])),
            "response_ids": to(self.response_ids[i, :t]), "response_mask": to(self.response_mask[i, :t]),
        }

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (checkpoints load with ``weights_only=True``)."""
        keys = ("prompt_ids", "prompt_mask", "context_ids", "response_ids", "response_mask")
        state = {k: getattr(self, k) for k in keys}
        state["rewards"] = self.rewards
        state["ids"] = None if self.ids is None else [None if i is None else str(i) for i in self.ids]
        return state

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ProbePairs":
        return cls(**state)


# ----------------------------------------------------------------------------- parameter subsets
def _has_adapters(named: Iterable[tuple[str, torch.nn.Parameter]]) -> bool:
    return any("lora_" in name for name, _ in named)


def select_parameters(
    policy: torch.nn.Module, params: str | Sequence[str] | None = "auto"
) -> list[tuple[str, torch.nn.Parameter]]:
    """The trainable parameters the gradients are taken over, as ``(name, parameter)`` pairs.

    Args:
        policy: the policy (peft / DDP / compile wrappers are fine; names are the peft model's).
        params:
            ``None``, ``"trainable"`` or ``"all"``: every parameter with ``requires_grad``.
            ``"auto"``: the LoRA adapter parameters when the policy has adapters, else every
            trainable parameter (with peft only the adapters are trainable anyway).
            ``"lora"``: the adapter parameters only (names containing ``lora_``); an error without.
            ``"last:K"``: the trainable parameters of the last K decoder layers (``layers.<i>.``).
            anything else: one glob pattern, a comma-separated string of them, or a list; a
            parameter is selected when a pattern matches a part of its name
            (``"layers.*.mlp"`` selects every MLP weight, ``"*lm_head*"`` the head).
    Returns:
        the selected pairs in module order; a ValueError when none is selected.
    """
    model = unwrap_policy(policy, strip_peft=False)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    spec = "trainable" if params is None else params
    if isinstance(spec, str) and spec.strip().lower() in ("auto", "trainable", "all", "lora"):
        spec = spec.strip().lower()
        if spec == "auto":
            spec = "lora" if _has_adapters(model.named_parameters()) else "trainable"
        if spec == "lora":
            chosen = [(n, p) for n, p in trainable if "lora_" in n]
            if not chosen:
                raise ValueError("params='lora': the policy has no trainable LoRA adapter parameters")
            return chosen
        if not trainable:
            raise ValueError("the policy has no trainable parameters")
        return trainable
    if isinstance(spec, str) and spec.strip().lower().startswith("last:"):
        k = int(spec.split(":", 1)[1])
        if k < 1:
            raise ValueError(f"params={spec!r}: K must be >= 1")
        layers = sorted({int(m.group(1)) for n, _ in trainable if (m := _LAYER.search(n))})
        keep = set(layers[-k:])
        chosen = [(n, p) for n, p in trainable if (m := _LAYER.search(n)) and int(m.group(1)) in keep]
        if not chosen:
            raise ValueError(f"params={spec!r}: no trainable parameter belongs to a decoder layer (layers.<i>.)")
        return chosen
    patterns = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    patterns = [p for p in patterns if p]

    def matches(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, f"*{p}*") for p in patterns)

    chosen = [(n, p) for n, p in trainable if matches(n)]
    if not chosen:
        example = trainable[0][0] if trainable else "-"
        raise ValueError(f"params={params!r} matches no trainable parameter (e.g. {example})")
    return chosen


def describe_parameters(named: Sequence[tuple[str, torch.nn.Parameter]], spec: Any) -> dict[str, Any]:
    """What the gradients are taken over: the spec, how many tensors and elements."""
    return {
        "spec": spec if spec is None or isinstance(spec, str) else list(spec),
        "tensors": len(named),
        "numel": int(sum(p.numel() for _, p in named)),
        "first": named[0][0] if named else None,
        "last": named[-1][0] if named else None,
    }


# ----------------------------------------------------------------------------- gradients
def _dot_and_norms(ga: Sequence[torch.Tensor | None], gb: Sequence[torch.Tensor | None]) -> tuple[float, float, float]:
    """<a, b>, |a|, |b| of two gradients given as per-parameter tuples (None = zero), accumulated
    per parameter in float32 and summed in float64."""
    dot = na = nb = 0.0
    for a, b in zip(ga, gb):
        if a is not None:
            a32 = a.detach().reshape(-1).float()
            na += float(torch.dot(a32, a32))
        if b is not None:
            b32 = b.detach().reshape(-1).float()
            nb += float(torch.dot(b32, b32))
        if a is not None and b is not None:
            dot += float(torch.dot(a32, b32))
    return dot, math.sqrt(na), math.sqrt(nb)


def _cosine(dot: float, na: float, nb: float) -> float:
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


def gradient_alignment(
    objective_a: Callable[[], torch.Tensor],
    objective_b: Callable[[], torch.Tensor],
    params: Sequence[torch.nn.Parameter],
) -> dict[str, float]:
    """Inner product, cosine and norms of the gradients of two scalar objectives.

    Each objective is a closure that runs its own forward and returns a scalar; its gradient is
    taken with ``torch.autograd.grad`` (nothing is written to ``.grad``) and its graph is freed
    before the next one is built, so the peak is two gradients plus one forward's activations.

    Returns:
        ``{"inner", "cosine", "norm_a", "norm_b", "value_a", "value_b"}`` (floats).
    """
    params = list(params)
    with torch.enable_grad():
        value_a = objective_a()
        ga = torch.autograd.grad(value_a, params, allow_unused=True)
        value_a = float(value_a.detach())
        value_b = objective_b()
        gb = torch.autograd.grad(value_b, params, allow_unused=True)
        value_b = float(value_b.detach())
    dot, na, nb = _dot_and_norms(ga, gb)
    del ga, gb
    return {
        "inner": dot, "cosine": _cosine(dot, na, nb), "norm_a": na, "norm_b": nb, "value_a": value_a, "value_b": value_b,
    }


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module):
    """Every submodule in eval mode (no dropout; HF gradient checkpointing is off outside train
    mode) for the duration; each submodule's own mode is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _score(policy, prefix_ids, prefix_mask, response_ids, response_mask, temperature, chunk_tokens, with_entropy):
    return score_responses(
        policy, prefix_ids, prefix_mask, response_ids, response_mask,
        temperature=temperature, with_entropy=with_entropy, chunk_tokens=chunk_tokens,
    )


def alignment_stats(
    policy: torch.nn.Module,
    pairs: ProbePairs,
    params: str | Sequence[str] | None = "auto",
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    entropy_bins: int | Sequence[float] = 5,
    entropy_edges: Sequence[float] | None = DEFAULT_ENTROPY_EDGES,
    position_edges: Sequence[float] = DEFAULT_POSITION_EDGES,
    per_sample: bool = True,
    device: torch.device | str | None = None,
    early_tokens: int = 8,
) -> dict[str, Any]:
    """Gradient alignment of log P(y) and log P(y|x) and the per-token gap, over ``pairs``.

    Args:
        policy: a Hugging Face causal LM or a peft wrapper (unsharded). It is put in eval mode for
            the computation and every submodule's mode is restored; ``.grad`` is never written.
        pairs: the (x, y) pairs.
        params: the parameter subset, see ``select_parameters`` (default: LoRA adapters if any,
            else every trainable parameter).
        temperature: logits are divided by it, as in the objectives (the sampling temperature).
        chunk_tokens: score with the chunked LM head (``module.update.logprob_chunk_tokens``).
        entropy_bins: number of quantile bins of the conditional entropy, or explicit edges.
        entropy_edges: fixed entropy bins (nats) reported as well (None: not reported).
        position_edges: token-position bins.
        per_sample: include the per-sample values in the result.
        device: where the rows go (default: the policy's first parameter's device).
        early_tokens: ``gap_by_entropy_split`` applies the quantile bins of all tokens to the
            first ``early_tokens`` tokens of each response and to the rest separately.
    Returns:
        ``{"summary", "by_reward", "gap_by_entropy", "gap_by_entropy_split", "gap_by_entropy_fixed",
        "gap_by_position", "token_gap", "params", "num_tokens", "seconds", "per_sample"}``; see
        ``summarize_alignment`` and ``token_gap_by_entropy``. ``inner`` is <g_m, g_c>.
    """
    started = time.perf_counter()
    named = select_parameters(policy, params)
    tensors = [p for _, p in named]
    device = device if device is not None else tensors[0].device
    rows, lc_all, lm_all, ent_all = [], [], [], []
    with eval_mode(policy):
        for i in range(len(pairs)):
            r = pairs.row(i, device)
            store: dict[str, torch.Tensor] = {}

            def conditional(r=r, store=store):
                lc, ent = _score(policy, r["prompt_ids"], r["prompt_mask"], r["response_ids"], r["response_mask"],
                                 temperature, chunk_tokens, True)
                store["lc"], store["ent"] = lc.detach(), ent.detach()
                return lc.sum()

            def marginal(r=r, store=store):
                lm, _ = _score(policy, r["context_ids"], r["context_mask"], r["response_ids"], r["response_mask"],
                               temperature, chunk_tokens, False)
                store["lm"] = lm.detach()
                return lm.sum()

            # objective a = marginal, b = conditional: inner = <g_m, g_c>
            res = gradient_alignment(marginal, conditional, tensors)
            length = int(r["response_mask"].sum())
            rows.append({
                "index": i,
                "id": None if pairs.ids is None else pairs.ids[i],
                "reward": None if pairs.rewards is None else float(pairs.rewards[i]),
                "length": length,
                "inner": res["inner"],
                "cosine": res["cosine"],
                "norm_marginal": res["norm_a"],
                "norm_conditional": res["norm_b"],
                "logprob_marginal": res["value_a"],
                "logprob_conditional": res["value_b"],
            })
            lc_all.append(store["lc"][0].float().cpu())
            lm_all.append(store["lm"][0].float().cpu())
            ent_all.append(store["ent"][0].float().cpu())
    lc, lm, ent = _pad_rows(lc_all), _pad_rows(lm_all), _pad_rows(ent_all)
    mask = _pad_rows([torch.ones_like(x) for x in lc_all])
    inner = [r["inner"] for r in rows]
    cosine = [r["cosine"] for r in rows]
    by_entropy = token_gap_by_entropy(lc, lm, ent, mask, bins=entropy_bins)
    edges = [by_entropy[0]["lo"]] + [r["hi"] for r in by_entropy] if by_entropy else []
    split = None
    if len(edges) >= 2 and all(b > a for a, b in zip(edges, edges[1:])):
        split = {
            "early_tokens": int(early_tokens),
            "early": token_gap_by_entropy(lc, lm, ent, mask, bins=edges, positions=(0, early_tokens)),
            "late": token_gap_by_entropy(lc, lm, ent, mask, bins=edges, positions=(early_tokens, None)),
        }
    out: dict[str, Any] = {
        "summary": summarize_alignment(
            inner, cosine, [r["norm_marginal"] for r in rows], [r["norm_conditional"] for r in rows]
        ),
        "by_reward": _by_reward(rows),
        "gap_by_entropy": by_entropy,
        "gap_by_entropy_split": split,
        "gap_by_entropy_fixed": (
            None if entropy_edges is None else token_gap_by_entropy(lc, lm, ent, mask, bins=list(entropy_edges))
        ),
        "gap_by_position": token_gap_by_position(lc, lm, mask, edges=position_edges),
        "token_gap": _token_gap_summary(lc, lm, ent, mask),
        "params": describe_parameters(named, params),
        "num_pairs": len(pairs),
        "num_tokens": int(mask.sum()),
        "temperature": float(temperature),
        "seconds": time.perf_counter() - started,
    }
    if per_sample:
        out["per_sample"] = rows
    return out


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    if not rows:
        return torch.zeros(0, 0)
    width = max(int(r.numel()) for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, width - r.numel())) for r in rows])


def _by_reward(rows: list[dict]) -> dict[str, Any] | None:
    if not rows or rows[0]["reward"] is None:
        return None
    out = {}
    for name, test in (("correct", lambda r: r > 0.5), ("wrong", lambda r: r <= 0.5)):
        sel = [r for r in rows if test(r["reward"])]
        out[name] = summarize_alignment([r["inner"] for r in sel], [r["cosine"] for r in sel]) if sel else {"n": 0}
    return out


# ----------------------------------------------------------------------------- pure summaries
def _stats(values: torch.Tensor) -> dict[str, float]:
    if values.numel() == 0:
        return {k: float("nan") for k in ("mean", "median", "std", "min", "max")}
    return {
        "mean": float(values.mean()),
        "median": float(values.median()),
        "std": float(values.std()) if values.numel() > 1 else 0.0,
        "min": float(values.min()),
        "max": float(values.max()),
    }


def summarize_alignment(
    inner: Sequence[float],
    cosine: Sequence[float],
    norm_marginal: Sequence[float] | None = None,
    norm_conditional: Sequence[float] | None = None,
) -> dict[str, Any]:
    """Set-level statistics of the per-sample inner products and cosines.

    Returns:
        ``n``, ``frac_negative`` (inner < 0), ``frac_positive`` (inner > 0), and
        ``inner_{mean,median,std,min,max}``, ``cosine_{...}`` (NaN cosines, from a zero
        gradient, are left out of the cosine statistics), and the mean norms when given.
    """
    ip = torch.tensor(list(inner), dtype=torch.float64)
    cs = torch.tensor(list(cosine), dtype=torch.float64)
    cs = cs[~torch.isnan(cs)]
    n = int(ip.numel())
    out: dict[str, Any] = {
        "n": n,
        "frac_negative": float((ip < 0).double().mean()) if n else float("nan"),
        "frac_positive": float((ip > 0).double().mean()) if n else float("nan"),
    }
    out.update({f"inner_{k}": v for k, v in _stats(ip).items()})
    out.update({f"cosine_{k}": v for k, v in _stats(cs).items()})
    for key, norms in (("norm_marginal_mean", norm_marginal), ("norm_conditional_mean", norm_conditional)):
        if norms is not None:
            out[key] = float(torch.tensor(list(norms), dtype=torch.float64).mean()) if n else float("nan")
    return out


def _bin_table(
    key: torch.Tensor, gap: torch.Tensor, entropy: torch.Tensor | None, edges: Sequence[float], kind: str
) -> list[dict]:
    """Rows ``{lo, hi, count, mean_gap, mean_abs_gap, median_gap, [mean_entropy]}`` of [lo, hi) bins of
    ``key`` (the last bin also holds ``hi``); empty bins are kept with count 0."""
    rows = []
    for b in range(len(edges) - 1):
        lo, hi = float(edges[b]), float(edges[b + 1])
        last = b == len(edges) - 2
        sel = (key >= lo) & ((key <= hi) if last else (key < hi))
        g = gap[sel]
        row = {
            "bin": b, "lo": lo, "hi": hi, "count": int(sel.sum()),
            "mean_gap": float(g.mean()) if g.numel() else float("nan"),
            "mean_abs_gap": float(g.abs().mean()) if g.numel() else float("nan"),
            "median_gap": float(g.median()) if g.numel() else float("nan"),
        }
        if entropy is not None:
            row["mean_entropy"] = float(entropy[sel].mean()) if g.numel() else float("nan")
        row["kind"] = kind
        rows.append(row)
    return rows


def token_gap_by_entropy(
    cond_logprobs: torch.Tensor,
    marg_logprobs: torch.Tensor,
    cond_entropy: torch.Tensor,
    mask: torch.Tensor,
    bins: int | Sequence[float] = 5,
    positions: tuple[int, int | None] | None = None,
) -> list[dict]:
    """The per-token gap log P(y_t | x, y_<t) - log P(y_t | c, y_<t) by conditional-entropy bin.

    Args:
        cond_logprobs, marg_logprobs, cond_entropy, mask: (N, T); only tokens with mask 1 count.
        bins: an int q: q quantile bins of the entropy over the masked tokens (edges that
            coincide, e.g. many ~0-entropy tokens, are merged); or a list of edges (fixed bins).
        positions: only the tokens at response positions [lo, hi) (hi None: to the end), e.g. to
            separate the entropy effect from the early-token effect.
    Returns:
        one dict per bin: ``lo``, ``hi`` (entropy, nats), ``count``, ``mean_gap``,
        ``mean_abs_gap``, ``median_gap``, ``mean_entropy``, ``kind`` (quantile | fixed). Positive
        gap: the question makes the token more likely.
    """
    m = mask.bool()
    if positions is not None:
        index = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
        lo, hi = positions
        m = m & (index >= lo) & (index < hi if hi is not None else True)
    gap = (cond_logprobs.float() - marg_logprobs.float())[m]
    ent = cond_entropy.float()[m]
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError("bins must be >= 1")
        if ent.numel() == 0:
            return []
        q = torch.quantile(ent.double(), torch.linspace(0, 1, bins + 1, dtype=torch.float64))
        edges = sorted(set(q.tolist()))
        if len(edges) == 1:
            edges = [edges[0], edges[0]]
        return _bin_table(ent, gap, ent, edges, "quantile")
    edges = [float(e) for e in bins]
    if len(edges) < 2 or any(b <= a for a, b in zip(edges, edges[1:])):
        raise ValueError(f"entropy bin edges must be increasing, at least two: {edges}")
    return _bin_table(ent, gap, ent, edges, "fixed")


def token_gap_by_position(
    cond_logprobs: torch.Tensor,
    marg_logprobs: torch.Tensor,
    mask: torch.Tensor,
    edges: Sequence[float] = DEFAULT_POSITION_EDGES,
) -> list[dict]:
    """The per-token gap by the token's position in its response (0 = first token), in
    [lo, hi) bins; bins past the longest response are dropped. Same row keys as
    ``token_gap_by_entropy`` (without ``mean_entropy``)."""
    m = mask.bool()
    pos = torch.arange(mask.shape[1]).unsqueeze(0).expand_as(mask)[m].float()
    gap = (cond_logprobs.float() - marg_logprobs.float())[m]
    rows = _bin_table(pos, gap, None, list(edges), "position")
    longest = float(pos.max()) if pos.numel() else -1.0
    return [r for r in rows if r["lo"] <= longest]


def _token_gap_summary(lc, lm, ent, mask) -> dict[str, float]:
    m = mask.bool()
    gap = (lc - lm)[m]
    e = ent[m]
    out = {"mean_gap": float(gap.mean()) if gap.numel() else float("nan"),
           "mean_abs_gap": float(gap.abs().mean()) if gap.numel() else float("nan"),
           "mean_entropy_conditional": float(e.mean()) if e.numel() else float("nan")}
    if gap.numel() > 1:
        # Spearman-free summary: Pearson correlation of |gap| with the conditional entropy.
        a, b = gap.abs().double(), e.double()
        a, b = a - a.mean(), b - b.mean()
        denom = float(a.norm() * b.norm())
        out["corr_abs_gap_entropy"] = float((a * b).sum()) / denom if denom > 0 else float("nan")
    return out
