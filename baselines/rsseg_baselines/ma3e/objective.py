"""The MA3E objective for the shared trainer: MSE on the masked background, OT over the window."""

from __future__ import annotations

from pathlib import Path

import torch

from rsseg.errors import ConfigError
from rsseg.pretrain.objective import bare
from rsseg_baselines.ma3e.network import Ma3eNet
from rsseg_baselines.ma3e.spec import Ma3eSpec
from rsseg_baselines.ma3e.windows import masking_noise, ot_loss, rotate_windows, sample_windows, window_problem, window_tokens
from rsseg_baselines.vit.network import mae_config, patchify
from rsseg_baselines.vit.objective import MaeObjective


class Ma3eObjective(MaeObjective):
    name = "ma3e"

    def __init__(self, spec: Ma3eSpec, image_size: int, in_channels: int):
        self.spec, self.optim = spec, spec.optim
        self.config = mae_config(spec, image_size, in_channels)
        self.grid = image_size // self.config.patch_size
        if (problem := window_problem(spec.window, self.grid)):
            raise ConfigError(f"ma3e.window: {problem}")
        self.network = Ma3eNet(self.config)

    def _forward(self, net, images: torch.Tensor, generator: torch.Generator):
        """(composite, (B, L) window membership on the host, predictions, mask). The window and the
        masking are drawn on the host and moved once: counting or selecting on the device would
        make the host wait for it."""
        s, p = self.spec, self.config.patch_size
        corners, angles = sample_windows(images.shape[0], self.grid, s.window, s.angle_range, generator)
        in_window = window_tokens(corners, self.grid, s.window)
        composite = rotate_windows(images, corners, angles, s.window, p)
        noise = masking_noise(in_window, s.mask_ratio, s.window_mask_ratio, generator).to(images.device)
        pred, mask = net(composite, noise, in_window.to(images.device))
        return composite, in_window, pred.float(), mask

    def loss(self, net, images, generator):
        s = self.spec
        _, in_window, pred, mask = self._forward(net, images, generator)
        target = patchify(images.float(), self.config.patch_size)  # (B, L, p*p*C), the tile before rotation
        if s.norm_pix_loss:
            target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        background = mask * (~in_window).to(mask.device, mask.dtype)  # masked background patches
        per_patch = ((pred - target) ** 2).mean(-1)
        bg_loss = (per_patch * background).sum() / background.sum().clamp_min(1)
        b, n_w, d = in_window.shape[0], s.window**2, pred.shape[-1]
        # (B, n_w) the window's patch indices in row-major order, found on the host
        where = in_window.nonzero()[:, 1].reshape(b, n_w)[..., None].expand(b, n_w, d).to(pred.device)
        win_pred = pred.gather(1, where)  # (B, n_w, D)
        win_target = target.gather(1, where)
        window_loss = ot_loss(win_pred, win_target, s.sinkhorn_eps, s.sinkhorn_iterations)
        return bg_loss + window_loss, {"loss_background": bg_loss.detach(), "loss_ot": window_loss.detach(),
                                       "masked_fraction": mask.detach().float().mean()}

    @torch.no_grad()
    def artifacts(self, net, images, generator, out_dir: Path, *, samples: int = 0, sample_steps: int = 0) -> list[Path]:
        """Tiles, their composites (rotated window), the masked composite and the prediction."""
        from rsseg.viz import save_grid

        net.eval()
        x = images[:4]
        composite, _, pred, mask = self._forward(net, x, generator)
        mae = bare(net).mae
        p = self.config.patch_size
        m = mask.unsqueeze(-1)
        shown = patchify(composite.float(), p)
        masked = mae.unpatchify(shown * (1 - m))
        recon = mae.unpatchify(pred * m + shown * (1 - m))
        net.train()
        return [save_grid([x, composite, masked, recon.clamp(-1, 1)], out_dir / "reconstruction.png",
                          ["tile", "rotated window", "masked", "reconstruction"])]


def build_objective(run, in_channels: int) -> Ma3eObjective:
    return Ma3eObjective(run.ma3e, run.data.tile_size, in_channels)
