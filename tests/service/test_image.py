"""The image, built from scratch with Podman and run: it serves a real photo on CPU.

Slow (a cold build is ~5 min), so it runs only where the tools are (.ci/run installs them):
deploy/image/smoke.py does the work and says what each step works around."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.helpers import HF_CACHE, REPO, require_shared

SMOKE = REPO / "deploy" / "image" / "smoke.py"
sys.path.insert(0, str(SMOKE.parent))
import smoke  # noqa: E402 - a script beside the Dockerfile's docs, not a package


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_image_builds_runs_and_classifies_a_photo():
    if missing := smoke.missing_tools():
        pytest.skip(f"needs {', '.join(missing)} (Debian: apt-get install podman runc debootstrap)")
    require_shared(HF_CACHE, smoke.PHOTO)
    result = subprocess.run(
        [sys.executable, str(SMOKE), "--remove-image"], capture_output=True, text=True
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "[smoke] OK:" in output
