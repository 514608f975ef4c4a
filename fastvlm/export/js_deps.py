"""The pinned transformers.js install (fastvlm/export/js: package.json + package-lock.json).

Used by the Node parity test and by `fastvlm export web` (which copies the browser bundle out of
it). `npm ci --ignore-scripts`: onnxruntime-node's install script downloads binaries from outside
the npm registry, while the CPU binaries it needs already ship in the package. The install is
cached: it reruns only when the lock file changed (a hash stamp inside node_modules).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError

PACKAGE_DIR = Path(__file__).with_name("js")
STAMP = ".fastvlm-lock-sha256"


def node_available() -> bool:
    return shutil.which("node") is not None and shutil.which("npm") is not None


def js_dir() -> Path:
    """Where node_modules lives: next to the lock file, or a user cache when that is read-only
    (an installed package); $FASTVLM_JS_DIR overrides both."""
    if os.environ.get("FASTVLM_JS_DIR"):
        return Path(os.environ["FASTVLM_JS_DIR"])
    if os.access(PACKAGE_DIR, os.W_OK):
        return PACKAGE_DIR
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastvlm" / "js"


def ensure_node_modules(log=print, timeout: float = 900) -> Path:
    """`npm ci --ignore-scripts` from the pinned lock file unless already done; → the folder
    holding node_modules (and generate.mjs)."""
    if not node_available():
        raise ConfigError("node and npm are needed here: install Node.js (>= 18) first")
    root = js_dir()
    if root != PACKAGE_DIR:  # the scripts are refreshed on every call, the install only on change
        root.mkdir(parents=True, exist_ok=True)
        for name in ("package.json", "package-lock.json", "generate.mjs"):
            shutil.copy2(PACKAGE_DIR / name, root / name)
    lock = (PACKAGE_DIR / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock).hexdigest()
    stamp = root / "node_modules" / STAMP
    if stamp.exists() and stamp.read_text().strip() == digest:
        return root
    log(f"installing the pinned transformers.js into {root} (npm ci --ignore-scripts)")
    cmd = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    try:
        r = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise ConfigError(f"npm ci did not finish in {timeout:.0f} s") from e
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-3:]
        raise ConfigError("npm ci failed: " + " | ".join(tail))
    stamp.write_text(digest + "\n")
    return root
