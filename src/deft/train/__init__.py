"""Training with the density loss: DensityConfig, DensityMixin / DeftTrainer, callbacks, a plain-loop
helper and the TRL integration."""
