"""Pre-training, the stage: one trainer for every objective (trainer.py, on Ray Train), its launch
and the ensure step that trains only what the checkpoint store (`rsseg.checkpoints`) lacks."""
