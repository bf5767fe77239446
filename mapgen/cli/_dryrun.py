"""``--dry-run`` for convert and export: what each rank would read, write and hold, before anything runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def report(what: str, results: list[dict[str, Any]], floor_root: Path, out: Path) -> None:
    """Print the per-rank table, the disk needed and an I/O time estimate at the plain-read floor measured
    now on ``floor_root``'s files."""
    import shutil

    from mapgen.runtime.api import read_floor

    dtypes = results[0]["dtypes"]
    overrides = dtypes.get("overrides") or {}
    kinds = sorted(set(overrides.values()))
    print(f"dry run: mapgen {what} (nothing read but headers, nothing written)")
    print(f"  megatron dtypes: {dtypes['params_dtype']}" + (f"; {len(overrides)} entries in {', '.join(kinds)} "
                                                            f"(e.g. {next(iter(overrides))})" if overrides else ""))
    print(f"  {'rank':>4}  {'reads':>10}  {'writes':>10}  {'items':>7}  {'largest':>10}  {'peak memory (est.)':>18}")
    for r in results:
        print(f"  {r['rank']:>4}  {_gib(r['read']):>10}  {_gib(r['write']):>10}  {r['entries']:>7}  "
              f"{_gib(r['largest']):>10}  {_gib(r['peak']):>18}")
    need = sum(r["write"] for r in results)
    parent = out.parent if out.parent.exists() else Path(".")
    free = shutil.disk_usage(parent).free
    print(f"  disk needed: {_gib(need)} in {out} (+ metadata); free there now: {_gib(free)}"
          + ("" if free > need else "  <- NOT ENOUGH"))
    rate, sample = read_floor(floor_root)
    busiest = max(max(r["read"], r["write"]) for r in results)
    total = max(r["read"] + r["write"] for r in results)
    print(f"  plain-read floor here: {rate / 2**30:.2f} GiB/s (read() of {_gib(sample)} of the input, page cache as it "
          f"is now)")
    print(f"  estimate at that floor: >= {total / rate:.1f} s of I/O on the busiest rank "
          f"({_gib(busiest)} its larger side), plus start-up")
