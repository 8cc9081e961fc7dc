"""Evaluation: refusal and quality metrics, capability (lm-eval), the judge, the eval table and plots."""
