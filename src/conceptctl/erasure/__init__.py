"""Concept erasure: anchor prompts and images, the DoCo trainer and its baselines, artifacts."""
