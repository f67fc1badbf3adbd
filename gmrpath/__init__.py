"""``gmrpath``: the command line, the one entry point above the library.

The library is three packages that import one way, each from those before it only::

    gmr_models  <-  pipeline  <-  training  <-  benchmarks  <-  gmrpath (this package)

:mod:`gmrpath.cli` assembles one sub-app per package: :mod:`gmrpath.slides` (``pipeline``),
:mod:`gmrpath.train` (``training``) and :mod:`gmrpath.bench` (``benchmarks``, under
``gmrpath benchmark``). Nothing in the library imports this package.
"""
