"""Agreement of a generation with the reference: tokens (with the top-2-margin exception) and logits.

Pure numpy. Two views of the same run:

- teacher forced: the reference scores the runner's own tokens, so both logits of every step share the
  context and are compared at every step; the runner's token must be the reference's argmax unless the
  reference's top-2 logits differ by less than ``margin`` at that step (a near tie either side may win);
- free running: the reference generates on its own; the two token streams must agree up to the first
  step whose reference top-2 margin is below ``margin`` (after it the contexts legitimately differ).

MoE routing has the same kind of legitimate disagreement inside the model: where the reference's k-th and
(k+1)-th router logits of a token are closer than a margin, fp16 activations may pick the other expert, and
everything after it differs by a whole expert's output. ``align_routes`` decides, (layer, token) by (layer,
token), whether the runner's experts are the reference's or a near-tie alternative (then the reference
is made to take the runner's experts, see reference.RouteForcing) or a real disagreement.
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


@dataclass
class RouteStats:
    rows: int = 0  # (layer, token) routing decisions compared
    near_ties: int = 0  # reference's k-th and (k+1)-th router logits closer than the margin
    forced: int = 0  # the runner took other experts at a near tie: the reference was made to take them
    bad: int = 0  # the runner took an expert the reference ranks below its k-th by more than the margin
    max_abs_logit_diff: float = 0.0  # max |runner router logit - reference router logit|

    def add(self, other: "RouteStats") -> None:
        self.rows += other.rows
        self.near_ties += other.near_ties
        self.forced += other.forced
        self.bad += other.bad
        self.max_abs_logit_diff = max(self.max_abs_logit_diff, other.max_abs_logit_diff)


def align_routes(ref_logits: np.ndarray, experts: np.ndarray, margin_rtol: float,
                 runner_logits: np.ndarray | None = None) -> tuple[np.ndarray, RouteStats]:
    """Router logits for the reference that pick the runner's experts wherever that is a near-tie choice.

    ref_logits [T, E]: the reference's router logits of T tokens; experts [T, k]: the experts the runner
    chose for them. A token's margin is ``margin_rtol * max(1, max |ref logit|)``. Where the runner's set
    differs from the reference's top k and every expert it took instead is within the margin of the
    reference's k-th logit, the logits of the swapped-in and swapped-out experts trade places (the
    reference then routes like the runner, with weights off by less than the margin); a clear-margin
    difference is counted as bad and left alone. Returns (logits [T, E] float64, RouteStats).
    """
    logits = np.array(ref_logits, dtype=np.float64)
    experts = np.asarray(experts)
    T, E = logits.shape
    if experts.ndim != 2 or experts.shape[0] != T or not 0 < experts.shape[1] < E:
        raise ValueError(f"experts: expected [T={T}, k] with 0 < k < {E}, got {experts.shape}")
    k = experts.shape[1]
    stats = RouteStats(rows=T)
    if runner_logits is not None and T:
        stats.max_abs_logit_diff = float(np.abs(np.asarray(runner_logits, np.float64) - logits).max())
    order = np.argsort(-logits, axis=1, kind="stable")
    for t in range(T):
        row = logits[t]
        margin = margin_rtol * max(1.0, float(np.abs(row).max()))
        kth = row[order[t, k - 1]]
        stats.near_ties += bool(kth - row[order[t, k]] < margin)
        top, mine = set(order[t, :k].tolist()), set(experts[t].tolist())
        if mine == top:
            continue
        if len(mine) != k or not mine <= set(range(E)):  # repeated or impossible experts: a runner bug
            stats.bad += 1
            continue
        intruders = sorted(mine - top, key=lambda e: -row[e])
        dropped = sorted(top - mine, key=lambda e: row[e])
        if any(kth - row[e] >= margin for e in intruders):
            stats.bad += 1
            continue
        stats.forced += 1
        for i, d in zip(intruders, dropped):
            row[i], row[d] = row[d], row[i]
    return logits, stats
