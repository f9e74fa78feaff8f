"""ropeserve's gateway and the pieces it runs: the default model and the embedded engine."""
