"""nr_study: a study platform for Neural Rejuvenation (Qiao et al., CVPR 2019)."""

__version__ = "0.1.0"
