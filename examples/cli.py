"""Run a shipped LightningCLI config: every callback, rule and schedule is configured in YAML.

    python examples/cli.py fit --config examples/configs/byol.yaml
    python examples/cli.py fit --config examples/configs/supervised.yaml --trainer.max_epochs=2

The configs name their model and datamodule by class path (``emascale_examples.selfsup.BYOL``,
``emascale_examples.selfsup.ImageData``, ...): the helper package in this directory.
"""

from lightning.pytorch.cli import LightningCLI


def main() -> None:
    LightningCLI(save_config_kwargs={"overwrite": True})


if __name__ == "__main__":
    main()
