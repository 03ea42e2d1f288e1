"""deft's version, in a module of its own: the recipes write it into every results.json without importing
the ``deft`` package facade."""

__version__ = "0.1.0"
