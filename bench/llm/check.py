"""Agreement of a generation with the reference: tokens (with the top-2-margin exception) and logits.

Pure numpy. Two views of the same run:

- teacher forced: the reference scores the runner's own tokens, so both logits of every step share the
  context and are compared at every step; the runner's token must be the reference's argmax unless the
  reference's top-2 logits differ by less than ``margin`` at that step (a near tie either side may win);
- free running: the reference generates on its own; the two token streams must agree up to the first
  step whose reference top-2 margin is below ``margin`` (after it the contexts legitimately differ).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def top2_margin(logits: np.ndarray) -> np.ndarray:
    """Largest minus second largest logit along the last axis: [..., V] -> [...]."""
    part = np.partition(np.asarray(logits, dtype=np.float64), -2, axis=-1)
    return part[..., -1] - part[..., -2]


@dataclass
class TeacherForced:
    steps: int  # steps compared
    max_abs_diff: float  # max |logit - ref logit| over all steps and the vocabulary
    ref_max_abs: float  # max |ref logit| (the scale the difference is read against)
    near_ties: int  # steps whose reference top-2 margin is below the margin
    excused: int  # steps whose token differs from the reference argmax at a near tie
    bad_steps: list  # steps whose token differs from the reference argmax with a clear margin

    @property
    def tokens_ok(self) -> bool:
        return not self.bad_steps


def teacher_forced(tokens: np.ndarray, logits: np.ndarray, ref_logits: np.ndarray, margin: float) -> TeacherForced:
    """Compare one sequence: tokens [n] the runner chose, logits [n, V] it saw, ref_logits [n, V] the
    reference's logits for the same contexts."""
    tokens, logits, ref = np.asarray(tokens), np.asarray(logits, np.float64), np.asarray(ref_logits, np.float64)
    if logits.shape != ref.shape or tokens.shape != ref.shape[:1]:
        raise ValueError(f"shapes: tokens {tokens.shape}, logits {logits.shape}, ref_logits {ref.shape} do not match")
    ties = top2_margin(ref) < margin
    differs = tokens != ref.argmax(axis=-1)
    return TeacherForced(
        steps=int(tokens.shape[0]), max_abs_diff=float(np.abs(logits - ref).max(initial=0.0)),
        ref_max_abs=float(np.abs(ref).max(initial=0.0)), near_ties=int(ties.sum()), excused=int((differs & ties).sum()),
        bad_steps=[int(i) for i in np.flatnonzero(differs & ~ties)],
    )


@dataclass
class FreeRunning:
    agreed: int  # leading steps with identical tokens
    steps: int
    diverged_at_near_tie: bool  # the first differing step (if any) had a reference top-2 margin below the margin

    @property
    def ok(self) -> bool:
        return self.agreed == self.steps or self.diverged_at_near_tie


def free_running(tokens: np.ndarray, ref_tokens: np.ndarray, ref_logits: np.ndarray, margin: float) -> FreeRunning:
    """Compare two greedy streams of one prompt: tokens [n] (runner), ref_tokens [n] and ref_logits [n, V]
    (the reference's own generation)."""
    tokens, ref_tokens = np.asarray(tokens), np.asarray(ref_tokens)
    if tokens.shape != ref_tokens.shape:
        raise ValueError(f"tokens: expected the reference's shape {ref_tokens.shape}, got {tokens.shape}")
    diff = np.flatnonzero(tokens != ref_tokens)
    if diff.size == 0:
        return FreeRunning(int(tokens.shape[0]), int(tokens.shape[0]), False)
    first = int(diff[0])
    return FreeRunning(first, int(tokens.shape[0]), bool(top2_margin(ref_logits[first]) < margin))
