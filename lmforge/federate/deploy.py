"""A federation on Flower's deployment runtime: a SuperLink (the server's side, gRPC) and one
SuperNode per site, each started with Flower's own commands; ``lmforge federate --superlink``
submits lmforge's apps to the SuperLink as a Flower App and waits for the run to finish.

At each site (its data never leaves it)::

    flower-supernode --insecure --superlink SERVER:9092 --node-config "data-path='/site/data'"

where ``/site/data`` is that site's ``prepare --kind images`` directory (``--task lm``: its
``prepare`` token directory). On the server's machine::

    flower-superlink --insecure
    lmforge federate --superlink 127.0.0.1:9093 --data HELD_OUT_DIR --clients N --out RUN_DIR ...

The Flower App written for the run (``app/``: ``pyproject.toml`` and one module naming lmforge's
ServerApp and ClientApp) carries no code of its own; every machine runs the lmforge it has
installed. The plan travels as a file on the server's machine (``plan-file`` in the run config):
the SuperLink runs the ServerApp there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lmforge.errors import UserError
from lmforge.fsutil import write_json, write_text
from lmforge.progress import status

CONNECTION = "lmforge"  # the SuperLink connection's name in the run's own Flower home

PYPROJECT = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "lmforge-federation"
version = "1.0.0"
description = "lmforge's ServerApp and ClientApp (the code is lmforge's, installed on every machine)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "lmforge"

[tool.flwr.app.components]
serverapp = "lmforge_federation:server"
clientapp = "lmforge_federation:client"

[tool.flwr.app.config]
plan-file = ""
"""

MODULE = '''"""The apps of an lmforge federation (see lmforge/federate/deploy.py)."""

from lmforge.federate import apps

client = apps.client_app
server = apps.server_app()
'''


def write_app(root: Path, superlink: str) -> Path:
    """The Flower App and a Flower home naming ``superlink`` (the SuperLink's Control API address)."""
    app = root / "app"
    write_text(app / "pyproject.toml", PYPROJECT)
    write_text(app / "lmforge_federation.py", MODULE)
    write_text(root / "flwr-home" / "config.toml",
               f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{superlink}"\n'
               "insecure = true\n")
    return app


def run_deployed(plan: dict, work: Path, superlink: str, timeout: float) -> dict:
    """Submit ``plan`` to the SuperLink at ``superlink`` and wait for the ServerApp's summary."""
    host, _, port = superlink.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--superlink takes HOST:PORT (the SuperLink's Control API, e.g. 127.0.0.1:9093), "
                        f"not {superlink!r}")
    app = write_app(work, superlink)
    plan_file = work / "plan.json"
    write_json(plan_file, plan)
    done = Path(plan["out"]) / "federated.json"
    flwr = Path(sys.executable).with_name("flwr")
    env = {**os.environ, "FLWR_HOME": str(work / "flwr-home")}
    status(f"submitting the federation to the SuperLink at {superlink}")
    try:
        r = subprocess.run([str(flwr), "run", str(app), CONNECTION, "--stream", "--run-config",
                            f'plan-file="{plan_file}"'], env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise UserError(f"the federation did not finish within {timeout:.0f} s") from None
    if not done.is_file():
        tail = (r.stdout + r.stderr).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"the federation on {superlink} stopped without a result: {tail[0][:300]}")
    return json.loads(done.read_text(encoding="utf-8"))
