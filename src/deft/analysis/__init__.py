"""Reading results: energy estimates, plots, trade-off curves and the run report."""
