"""MAE and ScaleMAE: a ViT pre-trained by the platform (shared trainer) on the same unlabelled
tiles as the DDPM, then read at blocks 3, 5, 7, 11 through a 4-scale neck.

- MAE (He et al. 2022): transformers' ``ViTMAEForPreTraining`` — 75 % of patches masked, the
  decoder reconstructs the masked patches' pixels, loss on per-patch normalised pixels.
- ScaleMAE (Reed et al. 2023): the same ViT with a GSD-scaled 2-D sin-cos positional encoding
  (patch grid x GSD ratio *before* the sin-cos) and a two-band (Laplacian) reconstruction loss:
  the decoder predicts a low-frequency band (the 2x average-pooled image) and a high-frequency
  band (the image minus the upsampled low band) of each masked patch. No library ships it;
  this is a compact implementation on the ViT, tested against the formulas.

ViT-B/16 is the paper's backbone; ``pico`` (width 64, 12 blocks, patch 8) keeps the same
structure (12 blocks, readout at 3, 5, 7, 11) small enough for a 2-core CPU.

    spec.py       the ``mae:`` and ``scalemae:`` blocks (ViT sizes, masking, optimiser, weights)
    network.py    the sin-cos tables, patches and bands; the ViTMAE config and ScaleMAE's network
    objective.py  the MAE and ScaleMAE objectives for the shared trainer
    encoder.py    the ViT read at its blocks (encoder contract) and the 4-scale neck
    weights.py    importers of the released weights (transformers ViTMAE, ScaleMAE's timm .pth)
    rules.py      what a run needs from its spec: GSD, tags, whether it pre-trains (the hooks)

Registered in `rsseg_baselines.methods` (MA3E reuses the network, objective and encoder).
"""
