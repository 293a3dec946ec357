"""What tests and benchmarks share to drive the project from outside: real processes
(``harness.processes``: `engine serve`, `engine keys create`, redis-server). Not part of the
package that is installed; never imported by ``engine``."""
