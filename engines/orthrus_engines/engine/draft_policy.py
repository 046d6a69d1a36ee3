"""The `auto` draft-length policy: before each decode step, pick the block length K (K = 1 is plain
AR) that maximises expected committed tokens per second for the running batch.

  tokens(K) = B * (1 + sum_{i<K} r_i)             r_i: rate at which draft position i is accepted
  time(K)   = O + T(B)            for K = 1  (one verify pass of the anchors)
            = O + T(B K) + T(B K) for K > 1  (a draft pass and a verify pass of B blocks)

With a causal-anchor head and the fused cycle (one verify+draft pass, see ModelRunner), r_1 = 1
(draft position 1 is the AR's own next token, which the pass commits anyway) and a step is one
pass of K verify rows plus K blocks of K - 1 draft rows:

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


class AutoDraftPolicy:
    def __init__(self, max_k: int, times: ForwardTimes, stats: AcceptanceStats, min_evidence: float = 1.0,
                 smoothing: float = 0.2, min_gain: float = 1.05, fused_times: ForwardTimes | None = None):
        self.max_k = max_k
        self.fused_times = fused_times  # set: the engine runs the fused cycle, whose passes these time
        self.times = times
        self.stats = stats
        self.min_evidence = min_evidence
        self.smoothing = smoothing
        self.min_gain = min_gain  # draft only when the model expects at least this speed-up over AR
        self.overhead: float | None = None  # seconds per step outside its passes (None: not measured yet)

    def expected_rate(self, k: int, batch: int) -> float:
        """Expected committed tokens per second with block length k for `batch` sequences."""
        rates = self.stats.rates()
        if self.fused_times is not None and k > 1:
            tokens, passes = batch * (1 + sum(rates[1:k])), self.fused_times(batch * k * k)
        else:
            tokens = batch * (1 + sum(rates[: k - 1]))
            passes = self.times(batch) if k == 1 else 2 * self.times(batch * k)
        return tokens / ((self.overhead or 0.0) + passes)

    def choose(self, batch: int) -> int:
        if batch < 1 or self.max_k == 1:
            return 1
        self.stats.tick()
        best = max(range(1, self.max_k + 1), key=lambda k: self.expected_rate(k, batch))
        if best > 1 and self.expected_rate(best, batch) < self.min_gain * self.expected_rate(1, batch):
            best = 1  # near break-even the model's errors decide, and AR is the safe side
        if best == 1 and self.stats.evidence < self.min_evidence:
            return self.max_k  # explore: re-measure acceptance now and then
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
