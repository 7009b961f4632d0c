"""`platform/` is a source root, not a package: the stdlib `platform` module must still win."""

import subprocess
import sys

from conftest import REPO

CHECK = "import platform, sys; print(platform.system()); assert platform.__file__.startswith(sys.base_prefix) or 'site' not in platform.__file__"


def test_no_init_in_platform_dir():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_from_repo_root():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "Linux"


def test_stdlib_platform_inside_venv_with_rsseg_imported():
    # rsseg, ray's and torch's imports of `platform` all see the stdlib module.
    code = "import rsseg, platform; import rsseg.cli; print(platform.system(), platform.python_version())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    system, version = out.stdout.split()
    assert system == "Linux" and version.count(".") == 2


def test_platform_console_script_is_the_cli():
    from pathlib import Path

    script = Path(sys.executable).parent / "platform"
    out = subprocess.run([str(script), "--version"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("rsseg ")
