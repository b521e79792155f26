"""repro: reproduce the tables of hybrid CNN-Transformer papers (CoAtNet, LeViT, CvT, EarlyConv)."""

__version__ = "0.1.0"
