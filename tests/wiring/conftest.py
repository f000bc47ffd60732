import pytest


@pytest.fixture
def sites(synthetic_sites):
    """Three synthetic hospitals as (name, folder) for the in-process grid."""
    return [(f"hospital-{'abc'[i]}", folder) for i, folder in enumerate(synthetic_sites)]
