"""Lightning callbacks: the DSRL phase switch, text samples in TensorBoard, checkpoints on faults,
logger flushes, reasoning-behaviour statistics of the rollouts."""

from prerl.callbacks.alignment import AlignmentProbe
from prerl.callbacks.behaviours import BehaviourLogger
from prerl.callbacks.fault_checkpoint import FaultCheckpoint
from prerl.callbacks.flush_loggers import FlushLoggers
from prerl.callbacks.phase_switch import PhaseSwitch
from prerl.callbacks.text_samples import TextSamples

__all__ = ["AlignmentProbe", "BehaviourLogger", "FaultCheckpoint", "FlushLoggers", "PhaseSwitch", "TextSamples"]
