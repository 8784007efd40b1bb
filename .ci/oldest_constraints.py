"""Print a pip constraints file that pins every declared dependency (and the `dev` extra) to its lowest declared
version, so CI can test the oldest end of each range as well as the newest: `python .ci/oldest_constraints.py`."""

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

project = tomllib.loads((Path(__file__).resolve().parent.parent / "pyproject.toml").read_text())["project"]
for line in project["dependencies"] + project["optional-dependencies"]["dev"]:
    requirement = Requirement(line)
    lowest = [spec.version for spec in requirement.specifier if spec.operator in (">=", "==")]
    if not lowest:
        sys.exit(f"{requirement.name} declares no lowest version; give it one (>=) in pyproject.toml")
    print(f"{requirement.name}=={lowest[0]}")
