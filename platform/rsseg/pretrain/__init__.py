"""Pre-training: UNet presets and the DDPM objective (core), one trainer for every objective
(trainer.py, on Ray Train) and the fingerprinted checkpoint store (store.py)."""
