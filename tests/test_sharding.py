"""FSDP on 2 CPU processes gives the same losses and parameters as DDP on the same data."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import tiny_spec
from prerl.fsdp import PolicyFSDPStrategy, mixed_precision

WORKER = Path(__file__).parent / "distributed" / "train_equivalence.py"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(strategy: str, out: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), "--strategy", strategy, "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads((out / f"{strategy}_losses.json").read_text())


@pytest.mark.slow
def test_fsdp_matches_ddp_for_conditional_and_marginal_objectives(tmp_path):
    ddp, fsdp = _run("ddp", tmp_path), _run("fsdp", tmp_path)
    for objective in ("conditional", "marginal"):
        assert len(ddp[objective]) == 3
        assert fsdp[objective] == pytest.approx(ddp[objective], rel=1e-4, abs=1e-6), objective
        a = torch.load(tmp_path / f"ddp_{objective}.ckpt", weights_only=False)["state_dict"]
        b = torch.load(tmp_path / f"fsdp_{objective}.ckpt", weights_only=False)["state_dict"]
        initial = dict(tiny_spec().build_model().named_parameters())
        policy_keys = [k for k in a if k.startswith("policy.")]
        assert policy_keys and sorted(policy_keys) == sorted(k for k in b if k.startswith("policy."))
        for key in policy_keys:
            torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4)
        # the runs trained: parameters moved away from the shared initialisation
        assert any(not torch.equal(a[k], initial[k[len("policy."):]].detach()) for k in policy_keys)


def test_strategy_validates_options_and_finds_layer_classes():
    with pytest.raises(ValueError, match="wrap_policy"):
        PolicyFSDPStrategy(wrap_policy="everything")
    with pytest.raises(ValueError, match="unknown dtype"):
        mixed_precision("bfloat8")
    strategy = PolicyFSDPStrategy(layer_classes=["GPTBlock"])
    with pytest.raises(ValueError, match="LlamaDecoderLayer"):
        strategy._block_classes(tiny_spec().build_model())


def test_layer_classes_by_name_or_import_path():
    model = tiny_spec().build_model()
    by_name = PolicyFSDPStrategy(layer_classes=["LlamaDecoderLayer"])._block_classes(model)
    by_path = PolicyFSDPStrategy(
        layer_classes=["transformers.models.llama.modeling_llama.LlamaDecoderLayer"]
    )._block_classes(model)
    assert by_name == by_path and [c.__name__ for c in by_name] == ["LlamaDecoderLayer"]
