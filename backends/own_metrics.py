"""What a backend's own Prometheus endpoint says about its load. Pure: text in, numbers out.

The proxy exports the backend's in-flight count beside its own
(`energy_proxy_backend_inflight_requests` next to `energy_proxy_inflight_requests`): when
the backend runs more requests than the proxy sent it, other traffic bypasses the proxy
and the energy those requests draw is attributed to the proxy's requests.
"""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

# Sample names of the requests a server is running right now, by server kind.
INFLIGHT_SAMPLES = (
    "vllm:num_requests_running",  # vLLM, one series per model_name
    "tgi_batch_current_size",  # TGI
    "llamacpp:requests_processing",  # llama.cpp's llama-server (--metrics)
)


def inflight_from_metrics(text: str) -> float | None:
    """The backend's own count of requests in flight, or None when it exports none we know.

    Series of one name are summed (vLLM exports one per model). Text that is not the
    Prometheus exposition format is None, not an error: the endpoint is optional.
    """
    total: float | None = None
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in INFLIGHT_SAMPLES:
                    total = (total or 0.0) + float(sample.value)
    except ValueError:
        return None
    return total
