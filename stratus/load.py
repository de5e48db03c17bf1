"""`stratus load rides|toystore ...`: the demo load scripts.

A small dispatcher: each load lives in its own module, imported only when
asked for (stratus/load_rides.py, stratus/load_toystore.py), and takes the
rest of the arguments."""
from __future__ import annotations

import importlib
import sys

LOADS = {
    "rides": ("stratus.load_rides", "steady ride-list reads on the rides service; prints slaves per second"),
    "toystore": ("stratus.load_toystore", "simulated toy store clients: queries and orders"),
}


def usage() -> str:
    lines = ["usage: stratus load KIND [ARGS]   (stratus load KIND --help for its options)", "", "kinds:"]
    lines += [f"  {k:<10} {v[1]}" for k, v in LOADS.items()]
    return "\n".join(lines)


def main(cmd: str = "load", args: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if args is None else args)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if args else 2
    kind, rest = args[0], args[1:]
    if kind not in LOADS:
        print(f"stratus {cmd}: unknown load {kind!r}\n\n{usage()}", file=sys.stderr)
        return 2
    mod = importlib.import_module(LOADS[kind][0])
    return int(mod.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main("load"))
