"""`platform/` is a source root, not a package: the stdlib `platform` module must still win."""

import subprocess
import sys

from conftest import REPO

# True when `import platform` gave the interpreter's own stdlib module (not a folder or module named platform)
CHECK = "import os, platform, sysconfig; print(os.path.dirname(platform.__file__ or '') == sysconfig.get_paths()['stdlib'])"


def test_no_init_in_platform_dir():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_stdlib_platform_from_repo_root():
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_negative_control_a_platform_package_in_the_working_directory_would_shadow_it(tmp_path):
    (tmp_path / "platform").mkdir()
    (tmp_path / "platform" / "__init__.py").write_text("")
    out = subprocess.run([sys.executable, "-c", CHECK], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_stdlib_platform_inside_venv_with_rsseg_imported():
    # rsseg, ray's and torch's imports of `platform` all see the stdlib module.
    code = "import rsseg, rsseg.cli; " + CHECK
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


def test_platform_console_script_is_the_cli():
    from pathlib import Path

    script = Path(sys.executable).parent / "platform"
    out = subprocess.run([str(script), "--version"], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("rsseg ")
