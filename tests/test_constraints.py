"""constraints.txt (what make installs) agrees with pyproject.toml's requirements and with
the environment the tests run in."""

import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
KEY = ("jax", "jaxlib", "flax", "orbax-checkpoint", "optax", "transformers", "diffusers",
       "torch")


def _pins():
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert m, f"constraints.txt: not a 'name==version' pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in pins, f"constraints.txt pins {name} twice"
        pins[name] = Version(m[2])
    return pins


def test_constraints_satisfy_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    pins = _pins()
    env = {"python_version": f"{sys.version_info.major}.{sys.version_info.minor}"}
    problems = []
    for text in reqs:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            problems.append(f"{req.name}: required by pyproject.toml, not pinned")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"{req.name}: pinned {pins[name]}, pyproject.toml wants "
                            f"{req.specifier}")
    assert not problems, "\n".join(problems)
    for name in KEY:
        assert canonicalize_name(name) in pins, f"constraints.txt does not pin {name}"


def test_environment_matches_constraints():
    """The tests ran on the pinned set (make installs it); a drifted venv is named."""
    pins = _pins()
    drift = []
    for name in KEY:
        installed = Version(metadata.version(name))
        pinned = pins[canonicalize_name(name)]
        if installed.public != pinned.public:       # torch's "+cpu" local tag aside
            drift.append(f"{name}: installed {installed}, constraints.txt pins {pinned}")
    assert not drift, "\n".join(drift)
