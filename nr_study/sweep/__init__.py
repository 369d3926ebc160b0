"""Ray Tune sweeps over search-space files: `nr-study sweep FILE` (see nr_study.sweep.space for the schema)."""
from nr_study.sweep.cli import cli_main
from nr_study.sweep.space import SearchSpace, dry_run_text, expand_trials, load_search_space, parse_search_space

__all__ = ["cli_main", "SearchSpace", "load_search_space", "parse_search_space", "expand_trials", "dry_run_text",
           "run_sweep"]


def run_sweep(*args, **kwargs):
    """See nr_study.sweep.runner.run_sweep (imported lazily: Ray is heavy)."""
    from nr_study.sweep.runner import run_sweep as _run

    return _run(*args, **kwargs)
