"""Pre-trained weights at rest: what a pre-training's result depends on (identity.py: the
fingerprint and trunk lineage) and the store that keeps it under that key (store.py), with the
imported released weights beside it. A library layer: the methods read trunks from it, the
pre-training stages (`rsseg.pretrain`) write them, and it imports neither."""
