"""The one runner: `python -m bench NAME [ARGS...]` runs the entry point
bench/NAME.py as its own __main__ (from the repository root, so `bench`,
`tests.harness` and `app` import without path patches); `python -m bench`
alone lists the entry points with the first line of each one's docstring.
"""

from __future__ import annotations

import ast
import runpy
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def entry_points() -> dict[str, str]:
    """Every module directly in bench/ but this runner and the package's own: name -> its summary line."""
    found = {}
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem.startswith("_"):
            continue
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        summary = docstring.split("\n\n")[0].replace("\n", " ")
        found[path.stem] = summary if len(summary) <= 100 else summary[:99] + "…"
    return found


def main(argv: list[str]) -> int:
    names = entry_points()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench NAME [ARGS...]   (NAME --help for its options)\n")
        width = max(map(len, names))
        for name, summary in names.items():
            print(f"  {name:<{width}}  {summary}")
        return 0
    name = argv[0].replace("-", "_")
    if name not in names:
        print(f"bench: no entry point {argv[0]!r}; one of: {', '.join(names)}", file=sys.stderr)
        return 2
    sys.argv = [f"python -m bench {name}", *argv[1:]]
    runpy.run_module(f"bench.{name}", run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
