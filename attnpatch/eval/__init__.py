"""Evaluation: offline task generators and (later) the lm-eval plugin and fidelity metrics."""
