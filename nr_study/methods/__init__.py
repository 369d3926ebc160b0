"""Training methods: one object per method, the same events for all (Composer's shape: a plain function does
the work, a thin class says when). The loop (nr_study.train) calls the events and never asks which method runs.

    on_fit_start(model) -> model   the model to train. A fresh run gets the new model: a method may transform it
                                   (BL-CA: CA form; NR-FS: the found widths) and attaches what it needs (NR's
                                   hook, SLIM's γ list). A resumed run calls load_state_dict(state) first and
                                   passes the checkpoint's model, already transformed.
    on_optimizer(opt)              the optimizer the loop built (start, after an event, resume): ReDo and CBP
                                   zero the optimizer state of the weights they recycle
    after_backward()               after loss.backward(), before the optimizer step (the L1 subgradient)
    end_of_step() -> Event | None  after the optimizer step
    end_of_epoch() -> Event | None after an epoch's last step, before evaluation
    metrics() -> dict              `lambda` (the L1 strength applied now), `rejuvenations` (how many so far),
                                   `recycled` and `dormant` (ReDo, CBP); the loop fills in what a method leaves out
    state_dict() / load_state_dict(state)

An Event is surgery or a prune: the new model (the loop adopts it and rebuilds its optimizer), the report it logs
as an artifact, and what the learning-rate schedule does next.

One file per method family (baseline, two_halves, rejuvenation, from_scratch, slimming, redo, cbp; what the two
recyclers share: recycling), each class registering itself
beside its implementation (registry.register_method). A new method is one new file: a Method subclass with
@register_method("NAME", ...); a module outside the package is loaded through $NR_STUDY_METHODS.
"""
from nr_study.methods.registry import METHODS, MethodInfo, load_plugins, register_method, resolved_nr
from nr_study.methods.base import Event, Method, make_method, prunable_gammas, prunable_graph
from nr_study.methods import baseline, two_halves, rejuvenation  # the built-in families register on import
from nr_study.methods.from_scratch import fs_spec
from nr_study.methods.slimming import slim_prune
from nr_study.methods import redo, cbp  # noqa: E402 - the recyclers register after the NR family and SLIM (listing order)

load_plugins()

__all__ = ["baseline", "two_halves", "rejuvenation", "redo", "cbp", "METHODS", "MethodInfo", "register_method", "resolved_nr", "Event", "Method", "make_method",
           "prunable_graph", "prunable_gammas", "slim_prune", "fs_spec"]
