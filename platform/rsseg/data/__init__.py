"""The data layer: datasets -> scenes (registry), the tile index (tiles), windowed torch
datasets with augmentation (dataset), class tables (classes) and per-pixel baselines."""

import os

# GDAL's block cache defaults to 5 % of RAM *per process*; with DataLoader and Ray workers that
# multiplies, and tiles are read about once per pass, so a big cache buys nothing. 64 MB keeps a
# reader's memory flat in scene size (docs/benchmarks.md); set GDAL_CACHEMAX yourself to override.
os.environ.setdefault("GDAL_CACHEMAX", "64")
