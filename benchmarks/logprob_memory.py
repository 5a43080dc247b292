#!/usr/bin/env python
"""Peak memory of one scoring forward + backward, plain full-vocabulary log-softmax vs the chunked
head (``module.update.logprob_chunk_tokens``), on SmolLM2-135M-Instruct (vocab 49,152).

    python benchmarks/logprob_memory.py                       # 8 rows x 256 response tokens, chunk 1024
    python benchmarks/logprob_memory.py --rows 16 --response-len 512 --chunk 512
    python benchmarks/logprob_memory.py --model tiny          # seconds, any machine (CI smoke)

Peak = the largest amount of memory allocated at once during the forward + backward, above what
was allocated before it (weights, inputs): on CPU from torch.profiler's allocator events, on a
GPU from ``torch.cuda.max_memory_allocated``. Both paths score the same random responses; the
script also prints the largest difference of their log-probs and gradients.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT))  # tools/

import torch  # noqa: E402

from prerl.scoring import score_responses  # noqa: E402
from tools.logits_bytes import peak_bytes  # noqa: E402


def build(model: str, device: str, checkpointing: bool):
    if model == "tiny":
        from prerl.models import TinyModelSpec

        spec = TinyModelSpec(hidden_size=128, num_layers=2, intermediate_size=256, gradient_checkpointing=checkpointing)
    else:
        from prerl.models import SmolLM2Spec

        spec = SmolLM2Spec(cache_dir=str(ROOT / "data" / "models" / "smollm2-135m-instruct"),
                           gradient_checkpointing=checkpointing)
    return spec.build_model().train().to(device)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rows", type=int, default=8, help="sequences in the micro-batch")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--response-len", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=256, help="logprob_chunk_tokens of the chunked path")
    parser.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                        help="as the GPU presets run (then the head's logits are most of the peak)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build(args.model, device, args.gradient_checkpointing)
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(3, vocab, (args.rows, args.prompt_len), generator=gen).to(device)
    response = torch.randint(3, vocab, (args.rows, args.response_len), generator=gen).to(device)
    prefix_mask = torch.ones_like(prefix)
    response_mask = torch.ones_like(response)
    response_mask[: args.rows // 2, args.response_len // 2 :] = 0  # half the rows end half-way

    results = {}
    for name, chunk in (("plain", None), ("chunked", args.chunk)):
        model.zero_grad(set_to_none=True)
        out = {}

        def step():
            logprobs, _ = score_responses(model, prefix, prefix_mask, response, response_mask, chunk_tokens=chunk)
            logprobs.sum().backward()
            out["logprobs"] = logprobs.detach()

        started = time.perf_counter()
        step()  # timed on its own: the CPU profiler slows every op
        seconds = time.perf_counter() - started
        model.zero_grad(set_to_none=True)
        peak = peak_bytes(step, torch.device(device))
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        results[name] = {"peak": peak, "seconds": seconds, "logprobs": out["logprobs"], "grads": grads}

    plain, chunked = results["plain"], results["chunked"]
    lp_diff = float((plain["logprobs"] - chunked["logprobs"]).abs().max())
    grad_diff = max(float((plain["grads"][n] - chunked["grads"][n]).abs().max()) for n in plain["grads"])
    logits_gib = args.rows * (args.response_len + 1) * vocab * 4 / 2**30
    print(f"model {args.model} (vocab {vocab}) on {device}, {args.rows} rows x {args.prompt_len}+{args.response_len} "
          f"tokens, half the rows padded to half length, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}; fp32 logits of the micro-batch: {logits_gib:.3f} GiB")
    print(f"{'path':<22}{'peak GiB':>10}{'seconds':>10}")
    for name, label in (("plain", "plain"), ("chunked", f"chunked ({args.chunk} tok)")):
        print(f"{label:<22}{results[name]['peak'] / 2**30:>10.3f}{results[name]['seconds']:>10.2f}")
    print(f"peak ratio plain / chunked: {plain['peak'] / max(chunked['peak'], 1):.2f}x; "
          f"max |log-prob diff| {lp_diff:.2e}, max |grad diff| {grad_diff:.2e}")
    return {"plain_peak": plain["peak"], "chunked_peak": chunked["peak"], "logprob_diff": lp_diff, "grad_diff": grad_diff}


if __name__ == "__main__":
    main()
