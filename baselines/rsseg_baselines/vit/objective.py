"""The MAE and ScaleMAE objectives for the shared trainer (network, optim, loss, describe, artifacts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from rsseg.pretrain.objective import bare
from rsseg_baselines.vit.network import ScaleMaeNet, init_mae, mae_config, norm_patches, patchify, two_bands
from rsseg_baselines.vit.rules import run_gsd
from rsseg_baselines.vit.spec import MaeSpec, ScaleMaeSpec


class MaeObjective:
    """The MAE objective for the shared trainer (network, optim, loss, describe, artifacts)."""

    name = "mae"

    def __init__(self, spec: MaeSpec, image_size: int, in_channels: int):
        from transformers import ViTMAEForPreTraining

        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.network = ViTMAEForPreTraining(self.config)
        init_mae(self.network)

    def noise(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        n = (images.shape[-1] // self.config.patch_size) ** 2
        return torch.rand((images.shape[0], n), generator=generator).to(images.device)

    def loss(self, net, images, generator):
        out = net(pixel_values=images, noise=self.noise(images, generator))
        # logged terms stay device tensors: the trainer reads them back once per flush
        return out.loss.float(), {"masked_fraction": out.mask.detach().float().mean()}

    def describe(self) -> dict[str, Any]:
        return {"kind": self.name, "config": self.config.to_dict(), "spec": self.spec.model_dump(mode="json")}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        """Originals, masked inputs and reconstructions of a few tiles."""
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        out = net(pixel_values=x, noise=self.noise(x, generator))
        p = self.config.patch_size
        target = patchify(x, p)
        pred = out.logits.float()
        if self.config.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            pred = pred * (target.var(-1, keepdim=True) + 1e-6) ** 0.5 + target.mean(-1, keepdim=True)
        m = out.mask.unsqueeze(-1)
        fold = bare(net).unpatchify
        masked = fold(target * (1 - m))
        recon = fold(pred * m + target * (1 - m))
        net.train()
        return [save_grid([x, masked, recon.clamp(-1, 1)], out_dir / "reconstruction.png", ["tile", "masked 75 %", "reconstruction"])]


class ScaleMaeObjective(MaeObjective):
    name = "scalemae"

    def __init__(self, spec: ScaleMaeSpec, image_size: int, in_channels: int, gsd: float):
        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.gsd = gsd
        self.scale = gsd / spec.reference_gsd
        self.network = ScaleMaeNet(self.config, self.scale)

    def loss(self, net, images, generator):
        p = self.config.patch_size
        high_pred, low_pred, mask = net(images, self.noise(images, generator))
        low, high = two_bands(images.float())
        low_t, high_t = patchify(low, p // 2), patchify(high, p)
        if self.spec.norm_pix_loss:
            low_t = norm_patches(low_t)
        l_low = ((low_pred.float() - low_t) ** 2).mean(-1)
        l_high = ((high_pred.float() - high_t) ** 2).mean(-1)
        n = mask.sum()
        low_loss, high_loss = (l_low * mask).sum() / n, (l_high * mask).sum() / n
        return low_loss + high_loss, {"loss_low": low_loss.detach(), "loss_high": high_loss.detach()}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "gsd": self.gsd, "scale": self.scale}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        high_pred, low_pred, mask = net(x, self.noise(x, generator))
        p = self.config.patch_size
        low, high = two_bands(x.float())
        mae = bare(net).mae
        m = mask.unsqueeze(-1)
        high_rec = mae.unpatchify(high_pred.float() * m + patchify(high, p) * (1 - m))
        net.train()
        return [save_grid([x, high.clamp(-1, 1), high_rec.clamp(-1, 1)], out_dir / "high_band.png",
                          ["tile", "high band", "high band, masked patches predicted"])]


def build_mae_objective(run, in_channels: int) -> MaeObjective:
    return MaeObjective(run.mae, run.data.tile_size, in_channels)


def build_scalemae_objective(run, in_channels: int) -> ScaleMaeObjective:
    return ScaleMaeObjective(run.scalemae, run.data.tile_size, in_channels, run_gsd(run))
