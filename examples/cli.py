"""Run a shipped LightningCLI config: every callback, rule and schedule is configured in YAML.

    python examples/cli.py fit --config examples/configs/byol.yaml
    python examples/cli.py fit --config examples/configs/supervised.yaml --trainer.max_epochs=2

The configs name their model and datamodule by class path (``emascale_examples.selfsup.BYOL``,
``emascale_examples.selfsup.ImageData``, ...): the helper package in this directory. byol.yaml and dino.yaml
train a ResNet-18 on the CPU, as byol.py and dino.py do: byol.yaml took 12 min on a 2-core CPU at load ~5, and
supervised.yaml about 2 min at load ~4.5 (measured with ``/usr/bin/time -v``).

Each run saves the config it ran with (the YAML plus the command-line overrides) next to its own outputs, in the
logger's directory: ``lightning_logs/<config>/version_<n>/config.yaml`` for the shipped configs, a new
``version_<n>`` per run. Nothing else is written to the working directory, and no file is ever overwritten:
``LightningCLI``'s default (``overwrite=False``) stops with an error before training if the run's directory
already holds a ``config.yaml`` (e.g. with ``--trainer.logger=false``, which saves into ``default_root_dir``).
"""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI()  # never pass save_config_kwargs={"overwrite": True}: it would replace a config.yaml found there


if __name__ == "__main__":
    main()
