"""Admitting new experts gradually: an initialisation of a grown model that starts equal to its base.

A grown MoE layer's new expert starts as a copy of an existing expert, router row included, so the
two tie in the router from the first token and the grown model does not compute what its base
computed (``expand.noise`` 0 or not). Router rows alone cannot fix that and still train: a bias-free
row's logit ``w.x`` flips sign with ``x``, so no row is sure to lose on every input (that takes an
offset), and an expert that is never chosen gets no gradient (its output and its softmax mass enter
the loss with weight 0), so rows that never win would stay never winning. What does both is a prior on the new experts' softmax
mass, ``new_expert_prior`` alpha (:class:`moelang.models.layermoe.common.ExpandedTopKRouter`):

* at alpha = 0 (the saved stage-0 model with ``expand.admit_steps`` > 0) no new expert is chosen and
  every original expert keeps its probability: old-language routing, and the whole forward, are
  exactly the base's;
* stage 1's step s (0-based) runs at alpha = min(1, (s + 1) / admit_steps): from the first step a new
  expert is chosen where its copied logit beats the k-th best by more than log(1 / alpha), so it
  trains on the tokens it suits best, and it competes on equal terms from step ``admit_steps`` on;
* the stage-1 model is saved with the alpha of its last step (1: ``admit_steps`` is at most stage
  1's steps, checked before any work), so stage 2 and evaluation route without any prior.

The schedule is a pure function of the step, set by the training method's ``before_step`` hook,
so a resumed stage 1 continues it exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from moelang.models.layermoe.common import ExpandedTopKRouter
from moelang.models.methods import ExpertSubset


def admission_prior(step: int, admit_steps: int) -> float:
    """The new-expert prior of training step ``step`` (0-based) when admission takes ``admit_steps``
    steps (0: no admission, 1 from the start)."""
    if admit_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / admit_steps)


def set_new_expert_prior(model: nn.Module, prior: float) -> None:
    """Every expanded router of ``model`` and its config take the new-expert prior ``prior`` (saved with
    the model)."""
    if not 0.0 <= prior <= 1.0:
        raise ValueError(f"new_expert_prior must lie in [0, 1], got {prior}")
    routers = [m for m in model.modules() if isinstance(m, ExpandedTopKRouter)]
    if not routers:
        raise ValueError(f"{type(model).__name__} has no expanded router to set a new-expert prior on")
    for router in routers:
        router.new_expert_prior = float(prior)
    model.config.new_expert_prior = float(prior)


@dataclass
class AdmittedExpertSubset(ExpertSubset):
    """:class:`ExpertSubset` (stage 1: the new experts and the routers) whose new experts are admitted
    over the first ``admit_steps`` steps (see the module docstring)."""

    admit_steps: int = 0

    def before_step(self, model: nn.Module, step: int) -> None:
        super().before_step(model, step)
        set_new_expert_prior(model, admission_prior(step, self.admit_steps))

    def describe(self) -> str:
        admission = f", new experts admitted over {self.admit_steps} steps" if self.admit_steps else ""
        return super().describe() + admission  # unchanged text without admission
