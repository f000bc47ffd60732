"""What the server and every hospital share: model, data, training, metrics, privacy.

Nothing in this package imports Flower, so the science can be tested without a
federation.
"""
