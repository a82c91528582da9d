"""retain's benchmark harness: ``python -m bench NAME [--size quick|full] [--json-out FILE]``.

``bench/`` lives beside the package but is not part of it: run it from the repository
root (``cd retain && python -m bench all``), where the repo root is on ``sys.path`` and
``retain`` itself comes from the installed (editable) package. Each benchmark prints a
table and writes JSON to ``bench/results/NAME.json`` (git-ignored). Every figure is set
beside a baseline measured in the same run, because the machines are shared and noisy.
"""

from __future__ import annotations

try:
    import retain  # noqa: F401  (the installed package, not a path next to bench/)
except ImportError as exc:  # pragma: no cover - a setup mistake, said in one line
    raise SystemExit(
        "bench needs the retain package installed: run 'pip install -e .' in the repository root"
    ) from exc
