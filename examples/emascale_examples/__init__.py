"""Code shared by the example scripts, the studies in studies/ and the LightningCLI configs: no script imports another."""
