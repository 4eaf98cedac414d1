"""The load-test harness: closed and open loops, capacity search, soak, benchmarks.

Commands: ``fashionserve loadtest run|capacity|soak|naive-server|bench``
(:mod:`fashionserve.cli.loadtest`). The pieces are :mod:`fashionserve.loadtest.generator`
(scheduling and worker processes), :mod:`fashionserve.loadtest.targets` (what is called),
:mod:`fashionserve.loadtest.recorder` (HdrHistograms and their merge),
:mod:`fashionserve.loadtest.report` (JSON, Markdown, plots, SLO),
:mod:`fashionserve.loadtest.capacity`, :mod:`fashionserve.loadtest.memory` (soak),
:mod:`fashionserve.loadtest.images` (what is sent), :mod:`fashionserve.loadtest.naive_server`
(the reference) and :mod:`fashionserve.loadtest.bench` (the standard benchmark: stack, runs,
report).
"""
