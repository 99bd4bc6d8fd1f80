"""environment.yml, pyproject.toml, the Makefile and .ci/run stay in step.

environment.yml is read with PyYAML, which papermill (a core dependency)
requires, so it is present wherever the package is installed.
"""

import os
import re
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pyproject():
    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.fixture(scope="module")
def env():
    return yaml.safe_load((REPO / "environment.yml").read_text())


def conda_deps(env):
    return [d for d in env["dependencies"] if isinstance(d, str)]


def pip_deps(env):
    (pip,) = [d["pip"] for d in env["dependencies"] if isinstance(d, dict)]
    return pip


def pip_requirements(env):
    """The env's pip lines that are requirements (not `-e .[…]`), by canonical name."""
    reqs = [Requirement(line) for line in pip_deps(env) if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def project_requirements(pyproject):
    reqs = [Requirement(line) for line in pyproject["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def test_python_version_matches_requires_python(env, pyproject):
    (python,) = [d for d in conda_deps(env) if d.startswith("python")]
    version = re.fullmatch(r"python\s*=+\s*([\d.]+)", python).group(1)
    assert Version(version) in SpecifierSet(pyproject["project"]["requires-python"])


def test_env_installs_package_editable_with_dev_extra(env, pyproject):
    editable = [line for line in pip_deps(env) if line.startswith("-e")]
    assert len(editable) == 1
    match = re.fullmatch(r"-e\s+\.\[([\w,\s-]+)\]", editable[0])
    assert match, editable[0]
    extras = {e.strip() for e in match.group(1).split(",")}
    assert "dev" in extras
    assert extras <= set(pyproject["project"]["optional-dependencies"])


def test_env_installs_torch_before_the_package(env):
    lines = pip_deps(env)
    torch_line = next(i for i, line in enumerate(lines) if line.startswith("torch"))
    package_line = next(i for i, line in enumerate(lines) if line.startswith("-e"))
    assert torch_line < package_line


def test_env_torch_pin_satisfies_pyproject(env, pyproject):
    pinned = pip_requirements(env)["torch"]
    (version,) = [s.version for s in pinned.specifier if s.operator == "=="]
    assert Version(version) in project_requirements(pyproject)["torch"].specifier


def test_env_pins_agree_with_pyproject(env, pyproject):
    """A version the env pins (`==`) must satisfy the pyproject specifier of the same package."""
    project = project_requirements(pyproject)
    for name, req in pip_requirements(env).items():
        for spec in req.specifier:
            if spec.operator == "==" and name in project:
                assert Version(spec.version) in project[name].specifier, (name, str(req), str(project[name]))


def test_env_requirements_are_package_dependencies_with_the_same_range(env, pyproject):
    """Besides the torch pin, what environment.yml lists is a pyproject dependency, with the same specifier."""
    project = project_requirements(pyproject)
    for name, req in pip_requirements(env).items():
        if name != "torch":
            assert name in project and req.specifier == project[name].specifier, (str(req), str(project.get(name)))


def test_transformers_range(pyproject):
    spec = project_requirements(pyproject)["transformers"].specifier
    assert Version("5.17") in spec and Version("5.24") in spec and Version("6.0") not in spec


def test_torchvision_never_required(env, pyproject):
    extras = pyproject["project"]["optional-dependencies"]
    lines = pyproject["project"]["dependencies"] + extras["dev"] + pip_deps(env)
    assert not any(line.startswith("torchvision") for line in lines)
    installs = [line for line in (REPO / "Makefile").read_text().splitlines() if "pip install" in line]
    assert installs and not any("torchvision" in line for line in installs)


def test_console_script(pyproject):
    assert pyproject["project"]["scripts"]["pixelrefer"] == "pixelrefer.cli:main"
    assert (REPO / "pixelrefer" / "cli.py").exists()


def test_pytest_markers_registered(pyproject):
    markers = {m.split(":")[0] for m in pyproject["tool"]["pytest"]["ini_options"]["markers"]}
    assert {"slow", "gpu", "notebooks", "browser"} <= markers


def test_makefile_setup_guards_torch_and_runs_offline():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"-c 'import torch' .*\|\| .*pip install .*torch==2\.13\.0", makefile)
    assert "export HF_HUB_OFFLINE" in makefile
    assert re.search(r"^test: setup\n\t\$\(PY\) -m pytest", makefile, re.M)


def test_ci_runs_make_test():
    ci = REPO / ".ci" / "run"
    text = ci.read_text()
    assert os.access(ci, os.X_OK)
    assert text.startswith("#!") and "set -euo pipefail" in text
    assert re.search(r"^make test\b", text, re.M)
