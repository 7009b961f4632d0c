"""MA3E (Li et al., ECCV 2024, "Masked Angle-Aware Autoencoder for Remote Sensing Images"): an
MAE whose input carries one randomly rotated square crop, so that the ViT has to learn about
orientation, the thing remote-sensing scenes vary most in.

Per tile (our reading of the paper and its release, not its code):

1. Scaling-centre crop: a window of ``window`` x ``window`` patches, patch-aligned, placed at
   random so that the disc the rotation reads from stays inside the tile (no black corners).
   Its content is replaced by the tile rotated about the window's centre by an angle drawn
   uniformly from [-angle_range, angle_range] degrees (bilinear) — the composite image.
2. Angle embedding: one learned vector is added to the window's patch tokens (after the patch
   projection and the positions, before masking), marking which tokens were rotated.
3. Masking: ``mask_ratio`` of the background patches and ``window_mask_ratio`` of the window's
   patches are masked (separately, so the window always keeps its share of visible tokens).
4. Loss: MSE on the masked background patches against the tile; over the window, the rotated
   patches no longer sit where the original ones were, so the window's predictions are matched
   to the ORIGINAL tile's window patches by optimal transport (entropic, Sinkhorn) on the
   squared distance of L2-normalised patches — the OT loss is <P, C> with P the plan.

Downstream, the ViT is read exactly as MAE's (rsseg_baselines.vit.encoder.build_encoder); the angle
embedding is a pre-training device and is left over.

    spec.py       the ``ma3e:`` block (window, angles, masking split, Sinkhorn)
    windows.py    the rotated window, the masking split and the optimal-transport loss (tensor maths)
    network.py    ViTMAE + the angle embedding
    objective.py  the MA3E objective for the shared trainer
    rules.py      the checks across blocks (window and masking against the run's tile)
"""
