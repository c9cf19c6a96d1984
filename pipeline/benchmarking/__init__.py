"""The real benchmark's parts: resumable units, measured runs, the methods, speed ratios, the report."""
