"""data.batch_size is the number of prompts per optimizer step across all ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed.global_batch import BATCH, STEPS, run
from helpers import ListSource, problems, tiny_spec
from prerl.data import PromptDataModule
from test_sharding import _free_port

WORKER = Path(__file__).parent / "distributed" / "global_batch.py"


@pytest.mark.slow
def test_two_processes_train_on_the_global_batch_and_match_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
         str(WORKER), "--devices", "2", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run(1, tmp_path)
    two, one = (json.loads((tmp_path / f"run_{n}.json").read_text()) for n in (2, 1))
    assert two["per_rank_batch"] == BATCH // 2 and one["per_rank_batch"] == BATCH
    assert two["global_step"] == one["global_step"] == STEPS
    for ids_two, ids_one in zip(two["steps"], one["steps"]):
        assert len(ids_two) == len(set(ids_two)) == BATCH  # 8 distinct prompts per step in total
        assert sorted(ids_two) == sorted(ids_one)  # the same prompts as one process with 8
    a, b = (torch.load(tmp_path / f"policy_{n}.pt") for n in (2, 1))
    initial = tiny_spec().build_model().state_dict()
    assert a.keys() == b.keys() and any(not torch.equal(a[k], initial[k]) for k in a)  # it trained
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)


def test_batch_size_must_divide_over_the_ranks(tiny_tokenizer, monkeypatch):
    dm = PromptDataModule(train=ListSource(problems(16)), tokenizer=tiny_tokenizer, batch_size=6, val_batch_size=3)
    monkeypatch.setattr(PromptDataModule, "_rank_world", lambda self: (1, 4))
    with pytest.raises(ValueError, match=r"data.batch_size=6 .* across all 4 ranks .* multiple of 4"):
        dm.setup()
    dm = PromptDataModule(train=ListSource(problems(16)), val=ListSource(problems(21)[16:]), tokenizer=tiny_tokenizer,
                          batch_size=8, val_batch_size=5)
    dm.setup()
    assert dm.per_rank_batch_size == 2 and dm.per_rank_val_batch_size == 2  # ceil(5 / 4)
    assert len(dm.train_dataloader()) == 16 // 8  # optimizer steps per epoch, not per-rank batches x ranks
    assert len(dm.val_dataloader()) == 1 and len(list(dm.val_dataloader().sampler)) == 2  # rank 1's share
