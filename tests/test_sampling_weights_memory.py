"""The memory estimator's items for ``engine_options.sampling_weights`` (tools/memory_estimate.py):
the bf16 view and the gathered copy are the bytes prerl.engines.sampling_weights really allocates,
and they replace the items they make unnecessary in the generation phases only."""

from dataclasses import replace

import pytest
import torch

from helpers import tiny_spec
from prerl.engines.sampling_weights import sampling_view
from tools.estimate_config import compose_config, setup_from_config
from tools.memory_estimate import TrainingSetup, estimate_memory, geometry_from_config

VIEW = "bf16 sampling view of the Linear weights (sampling_weights)"
COPY = "unsharded sampling copy (bf16 Linears, sampling_weights)"
QCOPY = "de-quantised sampling copy (bf16, LoRA merged, sampling_weights)"


def _bytes(tensors) -> int:
    """Bytes of distinct storages."""
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


def test_items_are_the_bytes_the_engine_allocates():
    for tied in (False, True):
        policy = tiny_spec(tie_word_embeddings=tied).build_model()
        g = geometry_from_config(policy.config)
        plain = TrainingSetup(preset="full", dtype="fp32", prompts_per_step=2, response_len=16, prompt_len=8,
                              sampling_weights=True)
        view = dict(estimate_memory(g, plain).phase("generation: last decode").items)[VIEW]
        copy = dict(estimate_memory(g, replace(plain, gpus=2, fsdp=True)).phase("generation: last decode").items)[COPY]
        with sampling_view(policy, "bfloat16", False, 4, 24, torch.device("cpu")):
            assert view == _bytes(p for p in policy.parameters() if p.dtype == torch.bfloat16), tied
        with sampling_view(policy, "bfloat16", True, 4, 24, torch.device("cpu")) as (model, _):
            assert copy == _bytes(model.parameters()), tied


def test_generation_items_are_replaced_and_training_is_unchanged():
    base = TrainingSetup(preset="full", dtype="fp32", prompts_per_step=8, response_len=1024, prompt_len=256)
    for setup in (base, replace(base, gpus=8, fsdp=True)):
        before, after = estimate_memory("qwen3-1.7b", setup), estimate_memory("qwen3-1.7b", replace(setup, sampling_weights=True))
        assert dict(before.phase("training").items) == dict(after.phase("training").items)
        old, new = dict(before.phase("generation: last decode").items), dict(after.phase("generation: last decode").items)
        gone = set(old) - set(new)
        if setup.fsdp:
            assert gone == {"FSDP root gathered for generate (fp32)", "FSDP 2 blocks gathered",
                            "autocast bf16 copy of the lm_head (from generate)"} and set(new) - set(old) == {COPY}
            built = dict(after.phase("sampling copy").items)
            assert built["gathered full state (fp32)"] == 4 * after.params["total"] and COPY in built
        else:
            # the view replaces autocast's per-use cast of one weight at a time (no cast cache in Lightning)
            assert gone == {"autocast bf16 cast of one weight (no cast cache)"} and set(new) - set(old) == {VIEW}


def test_config_mapping():
    on = setup_from_config(compose_config(["experiment=dsrl_qwen3_1p7b_1gpu",
                                           "+module.rollout.engine_options.sampling_weights=bfloat16"]))
    assert on.sampling_weights and not setup_from_config(compose_config(["experiment=dsrl_qwen3_1p7b_1gpu"])).sampling_weights


@pytest.mark.filterwarnings("ignore:.*quantization_config.*:UserWarning")
def test_qlora_copy_item_is_the_bytes_the_engine_allocates():
    """A 4-bit base (bf16 compute, as on a GPU): the de-quantised, merged copy, tied or not; only
    the generation phases carry it."""
    from prerl.models import TinyModelSpec

    for tied in (False, True):
        quant = {"type": "nf4", "double_quant": True, "compute_dtype": "bfloat16"}
        policy = TinyModelSpec(quantization=quant, lora={"r": 4, "alpha": 8}, dtype="bfloat16",
                               tie_word_embeddings=tied).build_model()
        setup = TrainingSetup(preset="qlora", dtype="bf16", lora_r=4, prompts_per_step=2, response_len=16,
                              prompt_len=8, sampling_weights=True)
        estimate = estimate_memory(geometry_from_config(policy.config), setup)
        item = dict(estimate.phase("generation: last decode").items)[QCOPY]
        assert QCOPY not in dict(estimate.phase("training").items)
        assert QCOPY not in dict(estimate_memory(geometry_from_config(policy.config),
                                                 replace(setup, sampling_weights=False)).phase("generation: last decode").items)
        with sampling_view(policy, "bfloat16", False, 4, 24, torch.device("cpu")) as (model, _):
            assert item == _bytes(model.parameters()), tied
