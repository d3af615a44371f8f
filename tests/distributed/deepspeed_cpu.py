"""DeepSpeed on this CPU, for the tests only: imported by the DeepSpeed run scripts before anything starts.

- DeepSpeed builds a shared-memory collective op (C++, about 130 s) the first time a CPU process group starts;
  gloo alone serves 2 processes, so the build is skipped.
- :class:`CPUDeepSpeedStrategy` runs Lightning's DeepSpeedStrategy on the CPU, which Lightning allows on CUDA
  GPUs only: no CUDA check, no device-index check, and ``device_rank`` the local rank (Lightning passes the CPU
  device's index, None).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

# by its module's full name: the package `deepspeed.comm` has an attribute `torch`, the torch module itself
importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class CPUDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's DeepSpeedStrategy on the CPU (tests only)."""

    def setup_environment(self) -> None:
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        with self._local_rank_as_device_rank():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _initialize_deepspeed_inference(self, model) -> None:
        with self._local_rank_as_device_rank():
            super()._initialize_deepspeed_inference(model)

    @contextlib.contextmanager
    def _local_rank_as_device_rank(self):
        """``deepspeed.initialize`` gets ``device_rank`` = the local rank (Lightning passes the CPU's index, None)."""
        original = deepspeed.initialize

        def initialize(*args, **kwargs):
            kwargs["args"] = argparse.Namespace(device_rank=self.local_rank)
            return original(*args, **kwargs)

        deepspeed.initialize = initialize
        try:
            yield
        finally:
            deepspeed.initialize = original
