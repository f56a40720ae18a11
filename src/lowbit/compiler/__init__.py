"""The pipeline machinery: graphs, passes, the pass manager, recipes and artifacts."""
