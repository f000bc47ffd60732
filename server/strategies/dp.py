"""Flower's DP wrappers, chosen by the ``dp`` setting."""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideAdaptiveClipping,
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideAdaptiveClipping,
    DifferentialPrivacyServerSideFixedClipping,
    Strategy,
)

from common.config import RunSettings


def dp_wrapper(settings: RunSettings, inner: Strategy, num_sampled: int,
               accountant: Any = None) -> Strategy:
    """Flower's DP wrapper for ``settings.dp`` around ``inner``; ``accountant``:
    Flower's, for the fixed-clipping wrappers (see ``budget``)."""
    z, c = settings.dp_noise_multiplier, settings.dp_clipping_norm
    stddev = settings.dp_clipped_count_stddev or max(num_sampled / 20, z)
    if settings.dp == "server-fixed":
        return DifferentialPrivacyServerSideFixedClipping(inner, z, c, num_sampled,
                                                         accountant=accountant)
    if settings.dp == "client-fixed":
        return DifferentialPrivacyClientSideFixedClipping(inner, z, c, num_sampled,
                                                         accountant=accountant)
    if settings.dp == "server-adaptive":
        return DifferentialPrivacyServerSideAdaptiveClipping(
            inner, z, num_sampled, initial_clipping_norm=c, clipped_count_stddev=stddev)
    if settings.dp == "client-adaptive":
        return DifferentialPrivacyClientSideAdaptiveClipping(
            inner, z, num_sampled, initial_clipping_norm=c, clipped_count_stddev=stddev)
    return inner
