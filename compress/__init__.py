"""compress: prune, distill, quantize, export and benchmark a trained PyTorch model.

The verbs a notebook wants, each on the code path the CLI uses: ``load``, ``prune``, ``distill``, ``quantize``,
``export``, ``optimize``, ``bench``, ``run``, ``drift`` and ``package`` (see :mod:`compress.api`).
"""
from .api import bench, distill, drift, export, load, optimize, package, prune, quantize, run
from .version import __version__

__all__ = ["__version__", "bench", "distill", "drift", "export", "load", "optimize", "package", "prune", "quantize", "run"]
