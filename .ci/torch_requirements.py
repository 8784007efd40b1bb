"""Print, one a line, the requirements of the torch installed in a virtual environment (whose site-packages is the
argument) that apply on this machine, so `.ci/oldest` can install them one at a time: PyPI's torch 2.11 is a CUDA
build whose nvidia-* wheels take about 3 GB to download and 5.7 GB installed, and one pip call for all of them holds
both at once (a CI run ran out of disk there, stop 75); one call each holds the installed ones and one download.

    python .ci/torch_requirements.py .venv-oldest/lib/python3.11/site-packages
"""

import sys
from importlib.metadata import distributions

from packaging.requirements import Requirement

if len(sys.argv) != 2:
    sys.exit("usage: python .ci/torch_requirements.py SITE_PACKAGES (the virtual environment's, with torch installed)")
torch = next(iter(distributions(name="torch", path=[sys.argv[1]])), None)
if torch is None:
    sys.exit(f"no torch in {sys.argv[1]}: install it there first (pip install --no-deps torch)")
for line in torch.requires or []:
    requirement = Requirement(line)
    if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
        extras = f"[{','.join(sorted(requirement.extras))}]" if requirement.extras else ""
        print(f"{requirement.name}{extras}{requirement.specifier}")
