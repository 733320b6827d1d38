"""The server's Prometheus metrics, in a registry of their own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from minigpt.prefix_cache import PrefixCache

UNMATCHED = "unmatched"  # the endpoint label of every path no route matches


def endpoint_label(route) -> str:
    """A request's `endpoint` label: the route's template (`/v1/models/{name}`), never the raw
    path, so a client probing random URLs cannot add series without bound."""
    return getattr(route, "path_format", None) or UNMATCHED


class Metrics:
    def __init__(self) -> None:
        self._prefix_seen = (0, 0)  # the prefix cache's (query, hit) tokens counted so far
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "minigpt_requests",
            "HTTP API requests by route template (unmatched: no route) and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.cancelled = Counter(
            "minigpt_requests_cancelled",
            "requests whose client went away mid-generation",
            registry=r,
        )
        self.prompt_tokens = Counter("minigpt_prompt_tokens", "prompt tokens", registry=r)
        self.generated_tokens = Counter("minigpt_generated_tokens", "tokens generated", registry=r)
        self.queue_depth = Gauge(
            "minigpt_queue_depth", "requests waiting for a batch row", registry=r
        )
        self.batch_size = Gauge("minigpt_batch_size", "sequences in the running batch", registry=r)
        self.prefix_query_tokens = Counter(
            "minigpt_prefix_cache_query_tokens",
            "prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_hit_tokens = Counter(
            "minigpt_prefix_cache_hit_tokens",
            "prompt tokens whose keys and values came from the prefix cache, not a prefill",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "minigpt_prefix_cache_hit_rate", "hit tokens / query tokens so far", registry=r
        )
        self.prefix_cached_tokens = Gauge(
            "minigpt_prefix_cache_tokens",
            "tokens whose keys and values the prefix cache holds (--kv-cache-mb)",
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "minigpt_time_to_first_token_seconds",
            "time from accepting a request to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )

    def observe_prefix_cache(self, cache: PrefixCache) -> None:
        """Bring the prefix-cache series up to the cache's own counts."""
        queried, hit = self._prefix_seen
        self.prefix_query_tokens.inc(cache.query_tokens - queried)
        self.prefix_hit_tokens.inc(cache.hit_tokens - hit)
        self._prefix_seen = (cache.query_tokens, cache.hit_tokens)
        self.prefix_hit_rate.set(cache.hit_tokens / max(1, cache.query_tokens))
        self.prefix_cached_tokens.set(cache.tokens)
