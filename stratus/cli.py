"""The `stratus` console script. Components run as `python -m <component>`;
this dispatcher starts them by module name, so it imports no component."""
from __future__ import annotations

import importlib
import os
import sys

# name -> (how it runs, help)
COMPONENTS = {
    "worker": "run one DB worker",
    "orchestrator": "run the orchestrator (control plane and API on :8081)",
    "gateway": "run the gateway (public front on :8080)",
    "dashboard": "run the dashboard (on :8086, reached through the gateway at /dashboard/)",
}
# The tenants' apps, the built-in ones (apps/) included, are run by the
# orchestrator: `stratus deploy` hands it one.
# name -> (module in stratus/, help)
COMMANDS = {
    "up": ("stratus.up", "run the whole platform as local processes (make up)"),
    "down": ("stratus.up", "stop a platform started with `stratus up --detach`"),
    "status": ("stratus.ctl", "the cluster as a table, like patronictl list"),
    "crash": ("stratus.ctl", "crash master|slave"),
    "switchover": ("stratus.ctl", "a planned change of master"),
    "tenant": ("stratus.ctl", "tenant create NAME | list | delete NAME"),
    "load": ("stratus.load", "load rides|toystore: the demo load scripts"),
    "deploy": ("stratus.apps_cli", "deploy PATH: pack a directory (manifest and code) and deploy it as an app"),
    "apps": ("stratus.apps_cli", "apps [TENANT]: the apps, their roles and instance counts"),
    "scale": ("stratus.apps_cli", "scale TENANT/APP/ROLE N: run N instances of a role"),
    "restart": ("stratus.apps_cli", "restart TENANT/APP: a rolling restart"),
    "events": ("stratus.apps_cli", "events [TENANT] [--since N] [--follow]: deploys, exits, restarts..."),
    "logs": ("stratus.apps_cli", "logs [COMPONENT] [--since T] [--grep TEXT] [--follow]"),
}


def usage() -> str:
    lines = ["usage: stratus COMMAND [ARGS]", "", "components (run in the foreground):"]
    lines += [f"  {k:<13} {v}" for k, v in COMPONENTS.items()]
    lines += ["", "commands:"]
    lines += [f"  {k:<13} {v[1]}" for k, v in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd in COMPONENTS:
        os.execv(sys.executable, [sys.executable, "-m", cmd, *rest])
    if cmd in COMMANDS:
        mod = importlib.import_module(COMMANDS[cmd][0])
        return int(mod.main(cmd, rest) or 0)
    print(f"stratus: unknown command {cmd!r}\n\n{usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
