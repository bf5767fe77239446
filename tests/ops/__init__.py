"""Tests of mapgen.ops, one file per op (a package, so that their module names cannot clash with other folders')."""
