"""Optuna samplers that Ray can pickle.

Ray pickles the searcher, and with it the Optuna sampler, into the sweep's state (`tuner.pkl` when the Tuner is
built, the searcher checkpoint while it runs, both read back by `--resume`). Since Optuna 5 the genetic samplers
(NSGA-II, NSGA-III) guard their generation cache with a `threading.Lock`, which pickle cannot copy: every
`sampler: nsga2` sweep died in `Tuner(...)`. The samplers here drop their locks when pickled and make fresh ones
when unpickled; a lock holds no state worth keeping across processes. Optuna 4 samplers hold no lock and pickle
as before.
"""
from __future__ import annotations

import threading

import optuna

_LOCK = type(threading.Lock())
_RLOCK = type(threading.RLock())


class _LockFreePickle:
    """Pickles without the instance's lock attributes; unpickling makes new, unlocked ones."""

    def __getstate__(self):
        state = dict(super().__getstate__() or {})
        locks = {k: isinstance(v, _RLOCK) for k, v in state.items() if isinstance(v, (_LOCK, _RLOCK))}
        for k in locks:
            del state[k]
        state["_nr_study_locks"] = locks
        return state

    def __setstate__(self, state):
        state = dict(state)
        locks = state.pop("_nr_study_locks", {})
        self.__dict__.update(state)
        for k, reentrant in locks.items():
            setattr(self, k, threading.RLock() if reentrant else threading.Lock())


class TPESampler(_LockFreePickle, optuna.samplers.TPESampler):
    pass


class NSGAIISampler(_LockFreePickle, optuna.samplers.NSGAIISampler):
    pass


SAMPLERS = {"tpe": lambda seed: TPESampler(seed=seed, multivariate=True),
            "nsga2": lambda seed: NSGAIISampler(seed=seed)}


def make_sampler(name: str, seed: int | None):
    """The sampler a search space names (`search.sampler`, one of `nr_study.sweep.space.SAMPLERS`)."""
    return SAMPLERS[name](seed)
