"""A container build context that serves one run: ``lmforge export RUN --format container``.

    Dockerfile        python:3.11-slim, the CPU build of torch at this lmforge's version, the other
                      serving dependencies pinned to the versions installed here, a health check
    requirements.txt  those pins
    serve.sh          the entry command: `lmforge serve` on 0.0.0.0, refusing to start without
                      $LMFORGE_API_KEY
    src/lmforge/      this lmforge's source
    run/              the run directory's own files (config, weights, tokenizer, labels, template)

``serve.sh`` runs outside a container as well (``LMFORGE_RUN``, ``LMFORGE_HOST``, ``PORT`` and
``PYTHONPATH`` override its defaults), which is how the tests check a context without Docker.
"""

from __future__ import annotations

import shutil
from importlib import metadata
from pathlib import Path

import torch

from lmforge.runs import RunDir

# What `lmforge serve` imports, besides torch (installed first, from PyTorch's CPU index).
SERVING = ("numpy", "tokenizers", "safetensors", "pyyaml", "tqdm", "matplotlib", "pillow", "kornia", "kornia_rs",
           "fastapi", "uvicorn", "prometheus_client")
PORT = 8000

DOCKERFILE = """\
# Serves one lmforge run: docker build -t NAME . && docker run -e LMFORGE_API_KEY=KEY -p {port}:{port} NAME
FROM python:3.11-slim
WORKDIR /app
# torch first and on its own, from the CPU index, so nothing pulls a CUDA build in its place.
RUN pip install --no-cache-dir "torch=={torch}" --index-url https://download.pytorch.org/whl/cpu
COPY requirements.txt .
RUN pip install --no-cache-dir -r requirements.txt
COPY src/ /app/src/
COPY run/ /app/run/
COPY serve.sh /app/serve.sh
ENV PYTHONPATH=/app/src LMFORGE_RUN=/app/run PORT={port}
EXPOSE {port}
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \\
  CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=4)"
CMD ["sh", "/app/serve.sh"]
"""

SERVE_SH = """\
#!/bin/sh
# The container's entry: lmforge serve on every interface of the container, behind an API key.
set -e
: "${{LMFORGE_API_KEY:?set LMFORGE_API_KEY: the server refuses to run without a key (docker run -e LMFORGE_API_KEY=...)}}"
here=$(cd "$(dirname "$0")" && pwd)
export PYTHONPATH="${{PYTHONPATH:-$here/src}}"
exec python -P -m lmforge serve "${{LMFORGE_RUN:-$here/run}}" --host "${{LMFORGE_HOST:-0.0.0.0}}" --port "${{PORT:-{port}}}" "$@"
"""


def _pins() -> list[str]:
    out = []
    for name in SERVING:
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def write_context(run_dir: str | Path, out: Path) -> dict:
    """Write the build context for ``run_dir`` into the (empty) directory ``out``."""
    import lmforge

    src = RunDir(run_dir)
    (out / "run").mkdir()
    files = []
    for name in (RunDir.CONFIG, RunDir.MODEL, RunDir.TOKENIZER, RunDir.LABELS, RunDir.CHAT_TEMPLATE):
        if (src.path / name).is_file():
            shutil.copy2(src.path / name, out / "run" / name)
            files.append(name)
    shutil.copytree(Path(lmforge.__file__).parent, out / "src" / "lmforge",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    torch_version = torch.__version__.split("+")[0]
    pins = _pins()
    (out / "requirements.txt").write_text("\n".join(pins) + "\n", encoding="utf-8")
    (out / "Dockerfile").write_text(DOCKERFILE.format(torch=torch_version, port=PORT), encoding="utf-8")
    (out / "serve.sh").write_text(SERVE_SH.format(port=PORT), encoding="utf-8")
    (out / "serve.sh").chmod(0o755)
    return {"format": "container", "run_files": files, "torch": torch_version, "requirements": pins,
            "entry": "sh serve.sh", "port": PORT}
