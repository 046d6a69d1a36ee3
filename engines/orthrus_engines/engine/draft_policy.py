"""The `auto` draft-length policy: before each decode step, pick the block length K (K = 1 is plain
AR) and the cycle that maximise expected committed tokens per second for the running batch.

  tokens(K) = B * (1 + sum_{i<K} r_i)             r_i: rate at which draft position i is accepted
  time(K)   = O + T(B)            for K = 1  (one verify pass of the anchors)
            = O + T(B K) + T(B K) for K > 1  (a draft pass and a verify pass of B blocks)

With a causal-anchor head the fused cycle (one verify+draft pass, see ModelRunner) is a third
kind of plan, K capped by the memory bound: r_1 = 1 (draft position 1 is the AR's own next token,
which the pass commits anyway) and a step is one pass of K verify rows plus K blocks of K - 1
draft rows:

  tokens(K) = B * (1 + sum_{2<=i<=K} r_i)
  time(K)   = O + Tf(B K K)

Tf(n) is the time of one verify+draft pass over n rows: a curve of its own (the pass differs from a
verify pass of as many rows), timed at start-up with real verify+draft passes and refined online.

`r_i` is measured online with exponentially decaying counts (a head may carry a prior measured at
evaluation). T(n), the time of one forward pass over n batched tokens, is measured at start-up on
this machine and refined with every pass the engine runs. O, the rest of a step (scheduling,
acceptance, detokenization), is learnt online from each step's wall time minus its passes, plain
and drafting steps alike, so that no estimate goes stale while the other kind of step runs. When
drafting has not been tried for a while, one step drafts at the full K to refresh the acceptance
estimate. Drafting must be expected to win by a margin (`min_gain`): near break-even, errors in
the model decide, and plain AR is the safe side.
"""

import bisect
from dataclasses import dataclass


class AcceptanceStats:
    """Per draft position i (1-based): how often it was drafted and accepted. Cumulative totals
    (for reports) and decayed counts (for the policy)."""

    def __init__(self, max_k: int, prior: list[float] | None = None, prior_weight: float = 1.0, decay: float = 0.998):
        self.max_k = max_k
        self.decay = decay
        n = max(0, max_k - 1)
        self.proposed, self.accepted = [0] * n, [0] * n
        self.cycles = 0
        prior = (prior or [0.5**i for i in range(1, n + 1)])[:n] + [0.0] * max(0, n - len(prior or []))
        self._p = [prior_weight] * n
        self._a = [prior_weight * r for r in prior]

    def record(self, drafted: int, accepted: int) -> None:
        """One sequence's cycle: `drafted` = K - 1 drafts, the first `accepted` of them accepted."""
        self.cycles += 1
        for arr in (self.proposed, self.accepted, self._p, self._a):  # a request may draft more than max_k
            arr.extend([0] * (drafted - len(arr)))
        for i in range(drafted):
            self.proposed[i] += 1
            self._p[i] += 1
            if i < accepted:
                self.accepted[i] += 1
                self._a[i] += 1

    def tick(self) -> None:
        """One decode step passed: old evidence fades."""
        self._p = [p * self.decay for p in self._p]
        self._a = [a * self.decay for a in self._a]

    @property
    def evidence(self) -> float:
        return self._p[0] if self._p else 0.0

    def rates(self) -> list[float]:
        """Decayed estimate of r_i, non-increasing in i (a draft is accepted only after its predecessors)."""
        out, prev = [], 1.0
        for p, a in zip(self._p[: self.max_k - 1], self._a):
            prev = min(prev, a / p if p > 0 else 0.0)
            out.append(prev)
        return out

    def snapshot(self) -> tuple[int, list[int], list[int]]:
        """Cumulative (cycles, drafted by position, accepted by position)."""
        return self.cycles, list(self.proposed), list(self.accepted)


class ForwardTimes:
    """T(n): seconds for one forward pass over n batched tokens, piecewise linear between measured n."""

    def __init__(self, measured: dict[int, float], smoothing: float = 0.2):
        self.ns = sorted(measured)
        self.ts = [measured[n] for n in self.ns]
        self.smoothing = smoothing

    def __call__(self, n: int) -> float:
        ns, ts = self.ns, self.ts
        if len(ns) == 1 or n > ns[-1]:  # beyond the ladder: proportional to its top (errs on the dear side)
            return ts[-1] * n / ns[-1]
        i = min(max(bisect.bisect_left(ns, n), 1), len(ns) - 1)
        n0, n1, t0, t1 = ns[i - 1], ns[i], ts[i - 1], ts[i]
        return max(t0 + (t1 - t0) * (n - n0) / (n1 - n0), 1e-9)

    def observe(self, n: int, seconds: float) -> None:
        """Blend a measured pass into T(n): the two ladder points around n move (in proportion to
        their weight in T(n)), so the curve stays as smooth as its ladder; a pass beyond the top
        informs the top point as T(top) = seconds * top / n. A single outlier (a stall) counts as
        at most 3x the current estimate."""
        ns = self.ns
        if n >= ns[-1]:
            n, seconds = ns[-1], seconds * ns[-1] / n
        n = max(n, ns[0])
        i = bisect.bisect_left(ns, n)
        if ns[i] == n:
            weights = {i: 1.0}
        else:
            w = (n - ns[i - 1]) / (ns[i] - ns[i - 1])
            weights = {i - 1: 1 - w, i: w}
        predicted = self(n)
        error = min(max(seconds, predicted / 3), predicted * 3) - predicted
        norm = sum(w * w for w in weights.values())
        for j, w in weights.items():  # T(n) moves by smoothing * error
            self.ts[j] = max(self.ts[j] + self.smoothing * error * w / norm, 1e-9)


@dataclass(frozen=True)
class Plan:
    """One decode step's shape: the block length k (1 = plain AR) and the cycle that runs it."""

    k: int
    fused: bool = False  # one verify+draft pass (causal-anchor heads), not a draft pass and a verify pass
    # cross-group (causal-anchor heads; a fixed plan, not among auto's): in each verify+draft pass the
    # sequences that carry drafts verify them (K rows, AR view) while about half of the others draft
    # (the anchor and K - 1 MASK rows); the roles swap at the next pass (ARCHITECTURE.md §1.3)
    cross: bool = False


class AutoDraftPolicy:
    """Picks the plan with the most expected tokens per second among plain AR, the two-pass cycle at
    K = 2 .. max_k and, where the head allows it, the fused cycle at K = 2 .. fused_k. Each cycle
    has its own acceptance stats (their draft positions differ) and its own pass-time curve."""

    def __init__(self, max_k: int, times: ForwardTimes, stats: AcceptanceStats, min_evidence: float = 1.0,
                 smoothing: float = 0.2, min_gain: float = 1.05, fused_k: int = 0,
                 fused_times: ForwardTimes | None = None, fused_stats: AcceptanceStats | None = None):
        self.max_k = max_k
        self.times = times
        self.stats = stats
        self.fused_k = fused_k if fused_times is not None else 0
        self.fused_times = fused_times
        self.fused_stats = fused_stats if fused_stats is not None else stats
        self.min_evidence = min_evidence
        self.smoothing = smoothing
        self.min_gain = min_gain  # draft only when the model expects at least this speed-up over AR
        self.overhead: float | None = None  # seconds per step outside its passes (None: not measured yet)

    @classmethod
    def calibrate(cls, runner, max_k: int, top: int, stats: AcceptanceStats, fused_k: int = 0,
                  fused_stats: AcceptanceStats | None = None) -> "AutoDraftPolicy":
        """A policy with this machine's pass times, measured at start-up on `runner` (a ModelRunner):
        verify-like passes over a ladder of n up to `top` rows and, where the fused cycle runs,
        verify+draft passes of one sequence at K = 2, 3, 4, 6, 8 .. and batches of full blocks.
        Larger passes are extrapolated; all are refined online."""
        ladder = sorted({n for n in (1, 2, 4, 8, 16, 32, 64, 128, 256) if n <= top} | {top})
        runner.time_forward(min(8, top))  # warm-up
        times = ForwardTimes({n: runner.time_forward(n, repeats=3) for n in ladder})  # min of 3: no stall
        fused_times = None
        if fused_k > 1:
            K = fused_k
            shapes = {k * k: (k, 1) for k in {2, 3, 4, 6, 8, 12, 16, 24, 32, K} if k <= K and (k * k <= top or k == 2)}
            shapes |= {b * K * K: (K, b) for b in (2, 4, 8, 16) if b * K * K <= top}
            fused_times = ForwardTimes({n: runner.time_verify_and_draft(k, b, repeats=3) for n, (k, b) in shapes.items()})
        return cls(max_k, times, stats, fused_k=fused_k, fused_times=fused_times, fused_stats=fused_stats)

    def plans(self) -> list[Plan]:
        return ([Plan(k) for k in range(1, self.max_k + 1)]
                + [Plan(k, fused=True) for k in range(2, self.fused_k + 1)])

    def expected_rate(self, plan: Plan | int, batch: int) -> float:
        """Expected committed tokens per second of `plan` for `batch` sequences (an int: a two-pass K)."""
        plan = plan if isinstance(plan, Plan) else Plan(plan)
        k = plan.k
        if plan.fused:
            rates = self.fused_stats.rates()
            tokens, passes = batch * (1 + sum(rates[1:k])), self.fused_times(batch * k * k)
        else:
            rates = self.stats.rates()
            tokens = batch * (1 + sum(rates[: k - 1]))
            passes = self.times(batch) if k == 1 else 2 * self.times(batch * k)
        return tokens / ((self.overhead or 0.0) + passes)

    def choose(self, batch: int) -> Plan:
        plans = self.plans()
        if batch < 1 or len(plans) == 1:
            return Plan(1)
        self.stats.tick()
        if self.fused_stats is not self.stats:
            self.fused_stats.tick()
        rate = {p: self.expected_rate(p, batch) for p in plans}
        best = max(plans, key=rate.__getitem__)
        if best.k > 1 and rate[best] < self.min_gain * rate[Plan(1)]:
            best = Plan(1)  # near break-even the model's errors decide, and AR is the safe side
        if best.k == 1:  # explore: re-measure the cycle known least now and then
            scouts = [(self.stats.evidence, Plan(self.max_k))] if self.max_k > 1 else []
            if self.fused_k > 1:
                scouts.append((self.fused_stats.evidence, Plan(self.fused_k, fused=True)))
            evidence, scout = min(scouts, key=lambda e: e[0])
            if evidence < self.min_evidence:
                return scout
        return best

    def observe_step(self, passes: list[tuple[int, float]], step_seconds: float, fused: bool = False) -> None:
        """A decode step: (tokens, seconds) of each pass (verify, or draft and verify, or one
        verify+draft pass if `fused`) and the step's whole wall time."""
        curve = self.fused_times if fused else self.times
        for n, s in passes:
            curve.observe(n, s)
        rest = max(step_seconds - sum(s for _, s in passes), 0.0)
        if self.overhead is None:
            self.overhead = rest
        else:  # one stall counts as at most 3x the estimate (with a floor, so a zero estimate can grow)
            rest = min(rest, 3 * self.overhead + 1e-3)
            self.overhead += self.smoothing * (rest - self.overhead)
