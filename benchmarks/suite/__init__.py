"""The benchmark suite behind ``make bench`` / ``benchmarks/run_all.py`` (issue 6).

One module per concern, in the order a run uses them:
  matrix     what to measure: targets, shapes, strategies, concurrency, presets, skipped targets
  workloads  model folders (random weights, FLAN-T5 shapes) and the ~100-token prompts
  machine    the machine described: CPU, cores, memory, measured bandwidth, GPU, versions
  floor      the physical floor: weight bytes one decoder step reads / bandwidth
  contenders the things timed: our server, engine-only, CTranslate2 direct, Transformers
  figures    latency percentiles, throughput, time per output token, speedups
  report     report.md (summary with the issue's targets, tables), plots (PNG)
  runner     the interleaved rounds, progress bar and JSON files
"""
