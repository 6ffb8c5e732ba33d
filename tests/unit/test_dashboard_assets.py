"""The page shipped in the package is exactly what `npm run build` makes from web/dashboard/.

Like the JSON Schema drift test: a change to the front-end source without a rebuild (or a
hand edit of the built files) fails here. Run `npm ci && npm run build` in web/dashboard/.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "web" / "dashboard"
SHIPPED = REPO / "gateway" / "dashboard" / "static"
BUILD_TIMEOUT_S = 120
REBUILD = "run `npm ci && npm run build` in web/dashboard/ and commit gateway/dashboard/static/"


def _build_into(outdir: Path) -> None:
    node = shutil.which("node")
    assert node is not None, "node not found: install the Debian package 'nodejs' (bootstrap)"
    assert (SOURCE / "node_modules" / "esbuild").is_dir(), (
        "web/dashboard/node_modules is missing: run scripts/bootstrap.sh (npm ci)"
    )
    subprocess.run(
        [node, "build.mjs", "--outdir", str(outdir)],
        cwd=SOURCE, check=True, timeout=BUILD_TIMEOUT_S, capture_output=True,
    )


def test_shipped_dashboard_assets_match_a_fresh_build(tmp_path: Path) -> None:
    _build_into(tmp_path)
    built = {p.name: p.read_bytes() for p in sorted(tmp_path.iterdir())}
    shipped = {p.name: p.read_bytes() for p in sorted(SHIPPED.iterdir())}
    assert sorted(built) == sorted(shipped), REBUILD
    differing = [name for name in built if built[name] != shipped[name]]
    assert not differing, f"{', '.join(differing)} differ from the build: {REBUILD}"


def test_the_lockfile_pins_every_runtime_dependency() -> None:
    package = json.loads((SOURCE / "package.json").read_text())
    lock = json.loads((SOURCE / "package-lock.json").read_text())
    for name, version in {**package["dependencies"], **package["devDependencies"]}.items():
        assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"{name}: pin an exact version"
        assert lock["packages"][f"node_modules/{name}"]["version"] == version, name


def test_the_page_loads_nothing_from_outside() -> None:
    """No CDN: every script, style and font comes from pumpgw itself."""
    page = (SHIPPED / "index.html").read_text()
    style = (SHIPPED / "app.css").read_text()
    assert not re.search(r"""(src|href)=["'](https?:)?//""", page)
    assert "@import" not in style
    assert not re.search(r"url\((['\"])?(https?:)?//", style)
