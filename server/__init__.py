"""The coordinator side: a Flower ServerApp, the run folder and the ``fedseg`` CLI."""
