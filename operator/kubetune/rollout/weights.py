"""Traffic weights: integer percentages split in proportion, and how they are written."""

from __future__ import annotations

from collections.abc import Mapping


def proportional(total: int, shares: Mapping[str, int]) -> dict[str, int]:
    """``total`` split in proportion to ``shares`` into integers that sum to ``total``.

    Largest remainder method; equal remainders go to the earlier key. A key with share 0 gets 0.
    """
    share_sum = sum(shares.values())
    if any(share < 0 for share in shares.values()):
        raise ValueError(f"shares must not be negative, got {dict(shares)}")
    if total == 0:
        return dict.fromkeys(shares, 0)
    if share_sum == 0:
        raise ValueError(f"cannot split {total} among {', '.join(shares) or 'nothing'}: every share is 0")
    split = {name: total * share // share_sum for name, share in shares.items()}
    remainders = {name: total * share % share_sum for name, share in shares.items()}
    order = sorted(shares, key=lambda name: -remainders[name])  # sorted() is stable: earlier keys first
    for name in order[: total - sum(split.values())]:
        split[name] += 1
    return split


def format_weights(weights: Mapping[str, int]) -> str:
    return ",".join(f"{name}={weight}" for name, weight in weights.items())
