"""/metrics in Prometheus' text format (version 0.0.4). A handful of counters and gauges read
from the scheduler: written out here rather than through prometheus_client, whose registry is
process-global and would add a dependency for a dozen lines."""
from __future__ import annotations

OUTCOMES = ("completed", "cancelled", "failed", "rejected", "invalid", "unauthorized")


def prometheus_text(scheduler) -> str:
    s = scheduler.stats
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP numallm_{name} {help_}")
        lines.append(f"# TYPE numallm_{name} {kind}")
        for labels, value in samples:
            lines.append(f"numallm_{name}{labels} {value}")

    metric("requests_total", "counter", "Requests by outcome.",
           [(f'{{outcome="{o}"}}', s.requests.get(o, 0)) for o in OUTCOMES])
    metric("prompt_tokens_total", "counter", "Prompt tokens of admitted requests.",
           [("", s.prompt_tokens)])
    metric("generation_tokens_total", "counter", "Tokens generated.", [("", s.generation_tokens)])
    metric("requests_active", "gauge", "Requests decoding now (slots in use).",
           [("", scheduler.n_active())])
    metric("queue_depth", "gauge", "Requests waiting for a slot.", [("", scheduler.queue_depth())])
    metric("slots", "gauge", "Sequences that decode together (--parallel).",
           [("", scheduler.parallel)])
    metric("generation_tokens_per_second", "gauge",
           "Tokens generated per second, all streams, over the last 10 s.",
           [("", round(scheduler.tokens_per_second(), 3))])
    metric("busy_seconds_total", "counter", "Seconds the worker spent in forward steps.",
           [("", round(s.busy_seconds, 3))])
    metric("decode_steps_total", "counter",
           "Batched decode forwards (each advances every decoding stream by one token).",
           [("", s.decode_steps)])
    metric("prefill_chunks_total", "counter", "Prompt chunks fed between decode steps.",
           [("", s.prefill_chunks)])
    metric("forward_passes_total", "counter", "Model forward passes of any kind (a batch counts once).",
           [("", getattr(scheduler.loaded, "passes", 0))])
    return "\n".join(lines) + "\n"
