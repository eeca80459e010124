"""tqbench — capacity, quality and latency benchmarks per KV-cache dtype for tqstack stacks.

Pipeline (one folder per stage):
  loadgen/  load generation (locust)          -> raw/*.jsonl via records.py
  quality/  GSM8K, needle-in-a-haystack, perplexity requests -> raw/*.jsonl
  capacity/ server-reported KV capacity, planner prediction, admission probe -> raw/*.jsonl
  metrics/  raw records -> pandas DataFrames
  report/   DataFrames -> CSV, Markdown tables, matplotlib plots, manifest
"""
