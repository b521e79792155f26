"""Reports: markdown tables (pandas -> tabulate) and plots, rendered from saved JSON and run
directories only."""
