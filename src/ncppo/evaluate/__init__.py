"""Evaluation: seeded sampling, reward-model scoring, win rates with bootstrap intervals."""

from .stats import mean_ci, paired_bootstrap_ci, win_rate

__all__ = ["mean_ci", "paired_bootstrap_ci", "win_rate"]
