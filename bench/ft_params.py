"""Trainable parameters at the paper's scale (Table 3's Ft-Params column), ours beside the paper's:
the fine-tuned part of each method (frozen: head and neck; fine-tuned: encoder too), 12 classes,
256² tiles. Construction only (random weights), no data.

    python bench/ft_params.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import append  # noqa: E402


def main() -> None:
    from rsseg.config.specs import DdpmFeaturesSpec, FinetuneSpec, NoiseScheduleSpec
    from rsseg.encoders import count_parameters
    from rsseg.encoders.ddpm import DdpmEncoder
    from rsseg.heads import NeckHead, build_head
    from rsseg.pretrain.ddpm import build_unet_from_config
    from rsseg.pretrain.unet import unet_config
    from rsseg.tables import published
    from rsseg_baselines.convnext import ConvNextEncoder, ConvNextSpec
    from rsseg_baselines.vit import MaeSpec, SimplePyramid, VitEncoder, mae_config

    ft = FinetuneSpec(upernet={"channels": 512, "auxiliary": True})
    paper = published.values("table3")
    rows = []

    def add(name, key, enc, neck, frozen_head, ft_head, note=""):
        info = neck.feature_info if neck is not None else enc.feature_info
        out = {}
        for setting, head_name in (("frozen", frozen_head), ("finetuned", ft_head)):
            head = build_head(head_name, info, 12, ft)
            head = NeckHead(neck, head) if neck is not None else head
            n = count_parameters(head) + (count_parameters(enc) if setting == "finetuned" else 0)
            out[setting] = (head_name, n / 1e6, paper.get((f"{key}/{setting}", "ft_params_M")))
        rows.append((name, out, note))

    add("ConvNeXt-B", "convnext_imagenet", ConvNextEncoder(ConvNextSpec(size="base"), 3, "x", imagenet=False), None, "upernet", "upernet")
    cfg = mae_config(MaeSpec(size="base"), 256, 3)
    for name, key in (("MAE ViT-B/16", "mae"), ("ScaleMAE ViT-B/16", "scalemae")):
        enc = VitEncoder(cfg, (3, 5, 7, 11), "x")
        add(name, key, enc, SimplePyramid(enc.feature_info), "mlp", "upernet")
    for preset in ("sr3", "ho256"):
        unet = build_unet_from_config(unet_config(preset, {}, in_channels=3, sample_size=256))
        for maps, what in ((None, "all 3 maps per resolution"), ([2], "1 map per resolution")):
            enc = DdpmEncoder(unet, NoiseScheduleSpec(), DdpmFeaturesSpec(timesteps=[150, 100, 50], maps=maps), "x")
            add(f"DDPM {preset}, {what}", "ddpm", enc, None, "mlp", "mlp")
    lines = ["Trainable parameters (M) at the paper's scale: 12 classes, 256² tiles; UPerNet 512 channels + FCN auxiliary head; "
             "ViT read at blocks 3/5/7/11 through the 4-scale neck (trained with the head in both settings); the MLP segmentor "
             "over the DDPM decoder maps at t = {50, 100, 150}.", "",
             "| method | frozen: head | ours | paper | fine-tuned: head | ours | paper |", "|---|---|---:|---:|---|---:|---:|"]
    for name, out, note in rows:
        f, t = out["frozen"], out["finetuned"]
        p = lambda v: "—" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {name} | {f[0]} | {f[1]:.1f} | {p(f[2])} | {t[0]} | {t[1]:.1f} | {p(t[2])} |")
    lines += ["", "ConvNeXt-B + UPerNet fine-tuned matches the paper's 122.0 M exactly. The others differ and we did not tune "
              "head widths to hit the paper's figures: the paper does not give its heads' widths, its frozen-ConvNeXt/ViT heads "
              "(21.6 / 23.2 M) are smaller than a 512-channel UPerNet or our MLP over 4 x 768 channels, its MAE fine-tuned "
              "total (96.4 M) is below ViT-B + any UPerNet-512 (our neck alone is 7.1 M), and its DDPM MLP segmentor (16.3 M) "
              "is reachable only with a UNet narrower than sr3 (the MLP's 3c -> 3c layers grow with c squared: one map per "
              "resolution gives 66.9 M on sr3, 11.3 M on ho256). Fine-tuned DDPM counts the whole UNet, including the up "
              "block that early exit never runs."]
    text = "\n".join(lines)
    print(text)
    append("Ft Params at the paper's scale: ours beside Table 3", text)


if __name__ == "__main__":
    main()
