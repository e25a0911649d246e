"""What a backend's own Prometheus endpoint says about its load. Pure: text in, numbers out.

The proxy exports the backend's in-flight count beside its own
(`energy_proxy_backend_inflight_requests` next to `energy_proxy_inflight_requests`): when
the backend runs more requests than the proxy sent it, other traffic bypasses the proxy
and the energy those requests draw is attributed to the proxy's requests. The token
totals serve the same cross-check for tokens (the backend's count against the proxy's).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True, slots=True)
class MetricNames:
    """Sample names (as the Prometheus text parser reports them) of one server kind."""

    inflight: frozenset[str] = frozenset()
    prompt_tokens_total: frozenset[str] = frozenset()
    completion_tokens_total: frozenset[str] = frozenset()
    waiting: frozenset[str] = frozenset()  # requests queued, not yet admitted

    def __or__(self, other: MetricNames) -> MetricNames:
        return MetricNames(
            self.inflight | other.inflight,
            self.prompt_tokens_total | other.prompt_tokens_total,
            self.completion_tokens_total | other.completion_tokens_total,
            self.waiting | other.waiting,
        )


# vLLM (vllm/v1/metrics/loggers.py): gauges and counters labelled model_name (and engine).
VLLM_METRICS = MetricNames(
    inflight=frozenset({"vllm:num_requests_running"}),
    prompt_tokens_total=frozenset({"vllm:prompt_tokens_total"}),
    completion_tokens_total=frozenset({"vllm:generation_tokens_total"}),
    waiting=frozenset({"vllm:num_requests_waiting"}),
)
# TGI (docs reference/metrics): token counts are histograms; their _sum is the running
# total. Input lengths are recorded at validation, generated tokens when a request ends.
TGI_METRICS = MetricNames(
    inflight=frozenset({"tgi_batch_current_size"}),
    prompt_tokens_total=frozenset({"tgi_request_input_length_sum"}),
    completion_tokens_total=frozenset({"tgi_request_generated_tokens_sum"}),
    waiting=frozenset({"tgi_queue_size"}),
)
# llama.cpp's llama-server with --metrics (tools/server/README.md).
LLAMACPP_METRICS = MetricNames(
    inflight=frozenset({"llamacpp:requests_processing"}),
    prompt_tokens_total=frozenset({"llamacpp:prompt_tokens_total"}),
    completion_tokens_total=frozenset({"llamacpp:tokens_predicted_total"}),
    waiting=frozenset({"llamacpp:requests_deferred"}),
)
# Any server we know: the names do not collide, so an unknown server is read with all.
ANY_METRICS = VLLM_METRICS | TGI_METRICS | LLAMACPP_METRICS

# Kept for callers of the first version of this module.
INFLIGHT_SAMPLES = tuple(sorted(ANY_METRICS.inflight))


@dataclass(frozen=True, slots=True)
class OwnMetrics:
    """A backend's own figures; None where it exports none we know.

    `inflight` is requests running now; the totals are tokens since the backend started
    (counters: they only grow, until the backend restarts).
    """

    inflight: float | None = None
    prompt_tokens_total: float | None = None
    completion_tokens_total: float | None = None
    waiting: float | None = None  # requests the backend has queued (not running yet)


NO_METRICS = OwnMetrics()


def parse_own_metrics(text: str, names: MetricNames = ANY_METRICS) -> OwnMetrics:
    """Read the figures named in `names` from Prometheus text.

    Series of one name are summed (vLLM exports one per model and engine). Text that is
    not the Prometheus exposition format gives all None, not an error: the endpoint is
    optional and may be something else entirely.
    """
    inflight: float | None = None
    prompt: float | None = None
    completion: float | None = None
    waiting: float | None = None
    # Only the few series read here go to the parser: a vLLM's page is mostly histograms
    # (tens of KB), and the gauges are read every 0.25 s while requests may be waiting.
    kept = "\n".join(_sample_lines(names).findall(text))
    try:
        for family in text_string_to_metric_families(kept):
            for sample in family.samples:
                name, value = sample.name, float(sample.value)
                if name in names.inflight:
                    inflight = (inflight or 0.0) + value
                elif name in names.prompt_tokens_total:
                    prompt = (prompt or 0.0) + value
                elif name in names.completion_tokens_total:
                    completion = (completion or 0.0) + value
                elif name in names.waiting:
                    waiting = (waiting or 0.0) + value
    except ValueError:
        return NO_METRICS
    return OwnMetrics(inflight, prompt, completion, waiting)


@functools.cache
def _sample_lines(names: MetricNames) -> re.Pattern[str]:
    """The sample lines of the series in `names` (with or without labels)."""
    wanted = sorted(
        names.inflight | names.prompt_tokens_total | names.completion_tokens_total | names.waiting
    )
    alternatives = "|".join(re.escape(n) for n in wanted) or "(?!)"
    return re.compile(rf"^(?:{alternatives})(?:\{{[^\n]*\}})?[ \t][^\n]*$", re.MULTILINE)


def inflight_from_metrics(text: str) -> float | None:
    """The backend's own count of requests in flight, or None when it exports none we know."""
    return parse_own_metrics(text).inflight
