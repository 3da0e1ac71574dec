"""Training and sampling pipeline: data, models, loops, evaluation, studies, plots and the
`debias` command line. A user of the core's public names, with dependencies of its own:
pip install "debias-kernels[pipeline]"."""
