"""Test layout: unit/ (no Lightning Trainer), lightning/ (the Trainer and Fabric), distributed/ (2 processes, each in
a subprocess with a timeout), examples/ (the example scripts). ``helpers.py`` here is shared by all four: its tiny
LightningModules and Trainer factory by the last three, its plain-PyTorch ``Annealed`` model by unit/."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

# Scripts the DeepSpeed tests launch in subprocesses: they patch DeepSpeed and need it installed (the `deepspeed`
# extra), so `--doctest-modules` must not import them into this process.
collect_ignore_glob = ["distributed/deepspeed_*.py", "examples/deepspeed_example_launcher.py"]
