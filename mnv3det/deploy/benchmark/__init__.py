"""The speed table of ``mnv3det benchmark`` (CLI: :mod:`mnv3det.cli.benchmark`).

* :mod:`~mnv3det.deploy.benchmark.zoo`: the models and configurations, and how each one runs;
* :mod:`~mnv3det.deploy.benchmark.timing`: the one statistics helper (timing loop, median/IQR,
  pooled rounds, peak memory);
* :mod:`~mnv3det.deploy.benchmark.runner`: prepare files, time each configuration in a
  subprocess;
* :mod:`~mnv3det.deploy.benchmark.report`: the markdown table.
"""
