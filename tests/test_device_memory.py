"""Peak accelerator memory per phase of an RL step (prerl.device_memory), with a simulated allocator."""

import lightning as L
import pytest
import torch
from helpers import make_datamodule, make_module, make_trainer
from lightning.pytorch.callbacks import Callback

from prerl import device_memory
from prerl.device_memory import GiB, PhasePeaks, process_peak_gib, reset_process_peak
from prerl.objectives import ConditionalRL

CPU = torch.device("cpu")


class FakeAllocator:
    """torch.cuda's two peak counters over allocations the test makes by hand."""

    def __init__(self):
        self.current = self.peak = 0

    def hold(self, gib: float):
        """Allocate ``gib`` GiB, for a ``with`` block."""
        allocator, size = self, int(gib * GiB)

        class Held:
            def __enter__(self):
                allocator.current += size
                allocator.peak = max(allocator.peak, allocator.current)

            def __exit__(self, *exc):
                allocator.current -= size

        return Held()

    def max_memory_allocated(self, device):
        return self.peak

    def reset_peak_memory_stats(self, device):
        self.peak = self.current


@pytest.fixture(autouse=True)
def _fresh_high_water():
    device_memory._high_water.clear()
    yield
    device_memory._high_water.clear()


def test_laps_measure_their_own_phase_and_the_process_peak_survives_them():
    fake = FakeAllocator()
    peaks = PhasePeaks(CPU, backend=fake)
    with fake.hold(1):  # the weights, alive throughout
        with fake.hold(6):
            pass
        assert peaks.lap() == 7.0  # load
        with fake.hold(2):
            pass
        assert peaks.lap() == 3.0  # a smaller phase reads its own peak, not the load's
        assert peaks.lap() == 1.0  # nothing allocated since: what is alive
        assert process_peak_gib(CPU, backend=fake) == 7.0  # resets inside laps did not erase it
        reset_process_peak(CPU, backend=fake)
        assert process_peak_gib(CPU, backend=fake) == 1.0


def test_cpu_has_no_peak_counter():
    assert device_memory.peak_backend(CPU) is None
    assert PhasePeaks(CPU).lap() is None and not PhasePeaks(CPU).enabled
    assert process_peak_gib(CPU) is None


class Metrics(Callback):
    """Keeps each step's memory metrics; between phases it holds 9 GiB for a moment (a checkpoint's
    write, say), which no phase's peak may count."""

    def __init__(self, fake):
        self.fake, self.train = fake, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        with self.fake.hold(9):
            pass

    def on_validation_start(self, trainer, pl_module):
        with self.fake.hold(9):
            pass

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.train.append({k: float(v) for k, v in trainer.callback_metrics.items() if "memory" in k})


def _fit(module, fake, callbacks=()):
    L.seed_everything(0)
    dm = make_datamodule(module.tokenizer)
    module.configure_model()
    trainer = make_trainer(2, callbacks, limit_val_batches=1, val_check_interval=1)
    with fake.hold(1):  # the model
        trainer.fit(module, datamodule=dm)
    return trainer


def test_module_logs_each_phase_peak():
    """Sampling holds 3 GiB, the update 5 GiB, validation's sampling 2 GiB, over 1 GiB of weights:
    each logged peak is its own phase's (a swapped or missing lap reads another phase's or the 9 GiB
    held between phases)."""
    fake = FakeAllocator()
    module = make_module(ConditionalRL(advantage="grpo"))
    module._memory = PhasePeaks(CPU, backend=fake)
    sample, run = module.sample, module.updater.run

    def sampling(*args, **kwargs):
        with fake.hold(3 if module.training else 2):
            return sample(*args, **kwargs)

    def updating(*args, **kwargs):
        with fake.hold(5):
            return run(*args, **kwargs)

    module.sample, module.updater.run = sampling, updating
    seen = Metrics(fake)
    trainer = _fit(module, fake, [seen])
    assert trainer.global_step == 2
    assert [m["train/memory/rollout_peak_gib"] for m in seen.train] == [4.0, 4.0]
    assert [m["train/memory/update_peak_gib"] for m in seen.train] == [6.0, 6.0]
    assert trainer.callback_metrics["val/memory/peak_gib"] == 3.0
    assert process_peak_gib(CPU, backend=fake) == 10.0  # the moment between phases


def test_module_on_cpu_logs_no_memory_keys():
    module = make_module(ConditionalRL(advantage="grpo"))
    trainer = _fit(module, FakeAllocator())
    assert trainer.global_step == 2
    assert not [k for k in trainer.callback_metrics if "memory" in k]
