"""The benchmark world: how protection is measured on the embedded default.

- `profile`: what a run computes (`BenchProfile`, `PROFILES`, `--config` files); `goals`: the goals and the
  one verdict function; `cells`: settings and cells; `summary`: derived figures; `report`: results.md and plots;
  `runner`: `run_bench`, cell reuse, reports over several runs; `demo`: `freezeasguard demo`.
- the scenarios' world: `emoji` (the image catalogue and scenarios), `relearn` (the taught base and its
  unlearned release), `evaluate` (sampling, metrics, validity checks), `recogniser` (the evaluator).

Nothing is imported here: import the module you need.
"""
