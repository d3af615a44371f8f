"""Runs examples/deepspeed_zero.py (path and arguments after this script's) in a torchrun worker, with DeepSpeed's
shared-memory op build skipped on this CPU (tests/distributed/deepspeed_cpu.py): the example as a user runs it, less
a 2-minute C++ build."""

import runpy
import sys
from pathlib import Path


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "distributed"))
    import deepspeed_cpu  # noqa: F401

    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, str(Path(script).parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
