"""Lightning callbacks: the DSRL phase switch, text samples in TensorBoard, run summary."""

from prerl.callbacks.phase_switch import PhaseSwitch
from prerl.callbacks.text_samples import TextSamples

__all__ = ["PhaseSwitch", "TextSamples"]
