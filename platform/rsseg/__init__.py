"""rsseg: label-efficient remote-sensing segmentation with diffusion features.

The package is laid out in data-flow order: data -> pretrain -> encoders -> heads -> finetune ->
sweep -> tables. The compute core (pretrain objectives, encoders, heads, the fine-tune step)
imports only torch, diffusers, transformers and numpy; ray, mlflow, rasterio and polars are
imported only by the modules that orchestrate, read rasters or build tables.
"""

from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("rsseg")
except _metadata.PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"
