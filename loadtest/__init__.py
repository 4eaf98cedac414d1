"""The load-test harness: closed and open loops, capacity search, soak, benchmarks.

Entry points: ``fashionserve loadtest run|capacity|soak|naive-server|bench``
(:mod:`loadtest.cli`); the pieces are :mod:`loadtest.generator` (scheduling and worker
processes), :mod:`loadtest.targets` (what is called), :mod:`loadtest.recorder`
(HdrHistograms and their merge), :mod:`loadtest.report` (JSON, Markdown, plots, SLO),
:mod:`loadtest.capacity`, :mod:`loadtest.memory` (soak), :mod:`loadtest.naive_server`
and :mod:`loadtest.bench`.
"""
