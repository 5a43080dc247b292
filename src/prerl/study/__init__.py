"""The reproduction study: arms x seeds trained and evaluated by one resumable runner, results
aggregated with their uncertainty, and a report generated from them (docs/reproduction.md).

``spec`` reads a study file (configs/study/*.yaml), ``runner`` trains / evaluates / collects each
run in subprocesses, ``results`` loads what the runs left, ``stats`` holds the bootstrap, and
``report`` writes the tables, the claims' verdicts and the plots.
"""
