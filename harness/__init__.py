"""What tests and benchmarks share to drive the project from outside: real processes
(``harness.processes``: `engine serve`, `engine keys create`, redis-server) and fakes
(``harness.fakes``: an engine without a model and a job service on it; ``harness.api_fakes``: the
API stack on a fake job service). Not part of the package that is installed; never imported by
``engine``."""
