"""ConvNeXt-B (transformers) on the encoder contract: random init, or ImageNet weights from a
local file or directory the user supplies (nothing is downloaded).

With transformers' UPerNet head (channels 512, pyramid pooling 1/2/3/6) and the FCN auxiliary
head, ConvNeXt-B counts 122.0 M parameters: the paper's Ft-Params for the fine-tuned ConvNeXt.
``pico`` is a CPU-sized ConvNeXt with the same four-stage structure, for the smoke profile.

    spec.py     the ``convnext:`` block and the ConvNeXt sizes (base, pico)
    weights.py  reading a local ImageNet checkpoint and checking it fits (keys and shapes)
    encoder.py  the four-stage encoder (encoder contract): random init or ImageNet weights
    rules.py    availability, checks and preflight of the ImageNet weights; the run tags
"""
