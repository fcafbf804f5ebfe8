"""``python -m nmgraph``: the same as the ``nmgraph`` command."""

from nmgraph.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
