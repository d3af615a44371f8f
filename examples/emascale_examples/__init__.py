"""Code the demos, the studies (studies/) and the LightningCLI configs share; scripts import it, never each other."""
