"""`python -m mapgen ...` is the same as the `mapgen` console script."""

from mapgen.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
