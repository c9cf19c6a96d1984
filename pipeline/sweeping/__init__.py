"""The `sweep` job's parts: search space -> trials, trials -> fused jobs, the results log, the report."""
