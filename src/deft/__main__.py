"""``python -m deft``: the ``deft`` command, also as ``torchrun ... -m deft train ...`` (torchrun runs
modules, not console scripts)."""

from deft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
