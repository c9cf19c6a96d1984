"""`python -m pipeline COMMAND ...`: the same CLI as the `featurecache` console script."""

from pipeline.cli import main

raise SystemExit(main(prog="python -m pipeline"))
