"""Privacy-preserving aggregation hooks: update checks, DP accounting, secure
aggregation settings. Pure math here; the Flower wiring is in server/ and client/."""
