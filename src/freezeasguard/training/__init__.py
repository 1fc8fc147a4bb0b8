"""The training core shared by every trainer in freezeasguard."""

from ..configs import TrainConfig
from .core import (
           TrainCallback,
           TrainContext,
           TrainResult,
           latest_checkpoint,
           make_accelerator,
           optimizer_state_bytes,
           release_process_group,
           train,
)

__all__ = ["TrainCallback", "TrainConfig", "TrainContext", "TrainResult", "latest_checkpoint", "make_accelerator",
           "optimizer_state_bytes", "release_process_group", "train"]
