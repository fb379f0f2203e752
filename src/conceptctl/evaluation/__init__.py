"""`conceptctl evaluate`: did the erasure work? Prompt suites, detectors, metrics, attacks and the
report, each kind swappable through plugins."""
