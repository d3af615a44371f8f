"""Test layout: unit/ (no Lightning), lightning/ (the Trainer and Fabric), distributed/ (2 processes, each in a
subprocess with a timeout), examples/ (the example scripts). ``helpers.py`` here is shared by the last three."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
