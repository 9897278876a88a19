"""One run's requests as a row: within-SLO share, accuracy, effective accuracy, client-side latency.

Effective accuracy (Model-Switching, HotCloud '20) counts the answers that are correct and
within the SLO over every request scheduled, answered or not: a late right answer is worth
as little as a wrong one.
"""
from __future__ import annotations

from dataclasses import dataclass

from agent.adaptive.replay import Request
from agent.stats import percentile


@dataclass(frozen=True)
class RunScore:
    mode: str
    requests: int                       # scheduled: answered + failed + skipped
    answered: int
    failed: int
    skipped: int
    within_slo: float                   # share of requests answered within the SLO
    accuracy: float | None              # correct answers over answers; None without labels
    effective_accuracy: float | None    # correct and within the SLO, over requests
    p50_ms: float | None                # client-side latency of the answers
    p95_ms: float | None
    p99_ms: float | None
    switches: int


def score(mode: str, requests: list[Request], slo_ms: float, switches: int) -> RunScore:
    answers = [r for r in requests if r.outcome == "answered"]
    total = len(requests)
    in_time = [r for r in answers if r.latency_ms <= slo_ms]
    labelled = bool(answers) and all(r.correct is not None for r in answers)
    latencies = sorted(r.latency_ms for r in answers)

    def pct(q: float) -> float | None:
        return percentile(latencies, q) if latencies else None

    return RunScore(
        mode=mode, requests=total, answered=len(answers),
        failed=sum(r.outcome == "failed" for r in requests), skipped=sum(r.outcome == "skipped" for r in requests),
        within_slo=len(in_time) / total if total else 0.0,
        accuracy=sum(r.correct for r in answers) / len(answers) if labelled else None,
        effective_accuracy=sum(r.correct for r in in_time) / total if labelled and total else None,
        p50_ms=pct(50), p95_ms=pct(95), p99_ms=pct(99), switches=switches,
    )


def score_table(rows: list[RunScore]) -> str:
    width = max(28, *(len(r.mode) for r in rows))
    lines = [f"{'mode':<{width}} {'requests':>8} {'in SLO':>7} {'accuracy':>8} {'eff. acc':>8} "
             f"{'p50 ms':>7} {'p95 ms':>7} {'p99 ms':>7} {'switches':>8}"]
    for r in rows:
        lines.append(f"{r.mode:<{width}} {r.requests:>8} {r.within_slo:>7.1%} {_share(r.accuracy):>8} "
                     f"{_share(r.effective_accuracy):>8} {_ms(r.p50_ms):>7} {_ms(r.p95_ms):>7} {_ms(r.p99_ms):>7} "
                     f"{r.switches:>8}")
    return "\n".join(lines)


def _share(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"
