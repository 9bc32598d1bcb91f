"""What a person reads: a run's report.md and plots, comparison tables and the Pareto plot."""
