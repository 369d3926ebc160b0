"""nr_study: a study platform for Neural Rejuvenation (Qiao et al., CVPR 2019)."""

__version__ = "0.1.0"


def load_model(ref: str, tracking_uri=None):
    """A run's final model in one line (run id, models:/<id>, or an exported folder): nr_study.tracking.load_model."""
    from nr_study.tracking import load_model as load

    return load(ref, tracking_uri)
