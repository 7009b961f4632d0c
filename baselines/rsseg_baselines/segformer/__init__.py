"""SegFormer (transformers' MiT encoder + the all-MLP decoder) on the encoder contract: random
init, or ImageNet MiT weights from a local transformers directory (nothing is downloaded).

MiT-B4 (depths 3/8/27/3, widths 64/128/320/512) with the 768-channel decoder head
(``finetune.segformer``, rsseg.heads.segformer) counts 64.0 M parameters with 12 classes: the
paper's 64.1 M for SegFormer-B4 in Tables 4-5. ``pico`` is a CPU-sized MiT with the same four
stages (strides 4, 8, 16, 32), for the smoke profile.

    spec.py     the ``segformer:`` block and the MiT sizes (b4, pico)
    weights.py  ImageNet MiT weights from a local transformers directory, their keys asserted
    encoder.py  the MiT's four stages (encoder contract): random init or ImageNet weights
    rules.py    the config-time check of the weights directory; the run tags
"""
