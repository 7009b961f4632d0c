"""ImageNet MiT weights from a local transformers directory, checked through the asserted lists."""

from __future__ import annotations

from pathlib import Path

from rsseg.errors import ConfigError
from rsseg.tensorfile import key_problems
from rsseg_baselines.segformer.spec import SIZES, SegformerSpec

# A SegformerForImageClassification (ImageNet MiT) or SegformerForSemanticSegmentation
# directory into the MiT encoder: only the classifier / the decode head have no place in it.
ALLOWED_UNEXPECTED_PREFIXES = ("classifier.", "decode_head.")


def load_imagenet(spec: SegformerSpec, in_channels: int):
    """The MiT encoder from a local transformers directory, its keys checked against the asserted
    lists (a missing encoder key or a shape that differs is an error naming the directory)."""
    from transformers import SegformerModel
    from transformers.utils import logging as hf_logging

    path = Path(spec.weights).expanduser()
    if not (path.is_dir() and (path / "config.json").exists()):
        raise ConfigError(f"segformer.weights: {path} is not a transformers model directory (expected config.json and model.safetensors)")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would print the keys checked below, as a table
    try:
        mit, info = SegformerModel.from_pretrained(str(path), local_files_only=True, output_loading_info=True,
                                                   drop_path_rate=spec.drop_path)
    except Exception as exc:  # noqa: BLE001 - any unreadable directory reads the same to the user
        raise ConfigError(f"segformer.weights: {path}: not loadable as a SegFormer ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    problems = key_problems(info["missing_keys"], info["unexpected_keys"], allowed_unexpected=ALLOWED_UNEXPECTED_PREFIXES)
    if info["mismatched_keys"]:
        problems.append(f"shapes differ for {', '.join(sorted(str(k) for k in info['mismatched_keys'])[:4])}")
    want = SIZES[spec.size]
    got = {k: list(getattr(mit.config, k)) for k in want}
    if got != want or mit.config.num_channels != in_channels:
        problems.append(f"it is a MiT with {got} and {mit.config.num_channels} bands, segformer.size {spec.size!r} with "
                        f"{in_channels} bands expects {want}")
    if problems:
        raise ConfigError(f"segformer.weights: {path} does not fit this SegFormer: {'; '.join(problems)}")
    return mit
