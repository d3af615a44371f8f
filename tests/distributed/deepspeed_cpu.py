"""DeepSpeed on this CPU, for the tests only: imported by the DeepSpeed run scripts before anything starts.

- DeepSpeed builds a shared-memory collective op (C++, about 130 s) the first time a CPU process group starts;
  gloo alone serves 2 processes, so the build is skipped.
- :class:`CPUDeepSpeedStrategy` runs Lightning's DeepSpeedStrategy on the CPU, which Lightning allows on CUDA
  GPUs only: no CUDA check, no device-index check, and ``device_rank`` the local rank (Lightning passes the CPU
  device's index, None).
"""

from __future__ import annotations

import argparse
import importlib
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")

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
        import deepspeed

        parameters = filter(lambda p: p.requires_grad, model.parameters())
        engine, deepspeed_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=parameters, optimizer=optimizer, lr_scheduler=lr_scheduler, dist_init_required=False,
        )  # fmt: skip
        return engine, deepspeed_optimizer
