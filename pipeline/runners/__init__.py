"""The runners, one per job, each top to bottom (setup -> run -> finish): extract,
distributed_extract, train, sweep, predict, bench. `pipeline/__init__.py` and the CLI call them."""
