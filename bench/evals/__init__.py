"""The evidence experiments' harness: methods as engine configs, seeded inputs, a resumable cell store,
a runner that shares engines between cells, pure aggregation, plots and the command line."""
