"""Admin-facing text: stats, model versions, metrics; and catalogue text cut to fit (pure functions,
tested without Telegram)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any

from ffengine.db import ModelVersion, ReplicaRecord, Stats


def shorten(text: str, limit: int) -> str:
    """``text`` within ``limit`` characters, an ellipsis marking a cut (catalogue titles and categories can be long)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.0f} ms"


def format_stats(stats: Stats, svc_health: Mapping[str, Any], index_size: int) -> str:
    lines = [
        "📊 Stats",
        f"Users: {stats.users} · searches: {stats.searches} ({stats.searches_ok} answered)",
        f"Ratings: {stats.ratings} (👍 {stats.likes} / 👎 {stats.dislikes})",
        "Like rate per model version:",
    ]
    lines += [f"• {name}: {rate.rate:.0%} of {rate.ratings}" for name, rate in sorted(stats.like_rate.items())] or ["• no ratings yet"]
    lines += [
        f"Latency p50 / p95: {_ms(stats.latency_p50_ms)} / {_ms(stats.latency_p95_ms)}",
        f"Catalogue: {stats.products} products ({index_size} in the active index)",
        f"Active model: {stats.active_model_version or '–'}",
        f"Queue: {svc_health['queue_depth']} waiting · {svc_health['searches_in_flight']} searches in flight",
    ]
    return "\n".join(lines)


def format_metrics(metrics: Mapping[str, Any] | None, limit: int = 4) -> str:
    if not metrics:
        return ""
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, int | float | str) and not isinstance(v, bool)][:limit]
    return ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)


def format_versions(versions: list[ModelVersion]) -> str:
    if not versions:
        return "No model versions yet."
    lines = ["Model versions (/rollback NAME switches):"]
    for v in versions:
        mark = "✅" if v.active else "•"
        metrics = format_metrics(v.metrics)
        lines.append(f"{mark} {v.name} (#{v.id}, {v.created_at:%Y-%m-%d %H:%M})" + (f": {metrics}" if metrics else ""))
    return "\n".join(lines)


def format_replicas(replicas: Sequence[ReplicaRecord], me: str, active: str | None) -> str:
    """Which replica answered and which model version each one serves (⚠️: not the active one yet)."""
    now = datetime.now(UTC)
    lines = [f"Answered by replica {me}. Replicas serving:"]
    for r in replicas:
        mark = "•" if r.model_version == active else "⚠️"
        lines.append(f"{mark} {r.name}: {r.model_version or '–'} (seen {max(0.0, (now - r.last_seen).total_seconds()):.0f} s ago)")
    return "\n".join(lines)
