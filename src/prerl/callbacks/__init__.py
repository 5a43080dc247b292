"""Lightning callbacks: the DSRL phase switch, text samples in TensorBoard, pre-emption saves."""

from prerl.callbacks.phase_switch import PhaseSwitch
from prerl.callbacks.preemption import PreemptionCheckpoint
from prerl.callbacks.text_samples import TextSamples

__all__ = ["PhaseSwitch", "PreemptionCheckpoint", "TextSamples"]
