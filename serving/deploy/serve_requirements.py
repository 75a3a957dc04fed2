"""Print the requirements of `braintumor[serve]` from pyproject.toml, its braintumor[...] self-references expanded:
the Bento's requirements_txt (serving/deploy/bentofile.yaml), made as the Dockerfile's dependency layer makes its own.

    python serving/deploy/serve_requirements.py > dist/requirements-serve.txt
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def serve_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    extras = project["optional-dependencies"]

    def expand(requirements: list[str]) -> list[str]:
        out = []
        for requirement in requirements:
            if requirement.startswith(f"{project['name']}["):
                out += expand(extras[requirement.split("[", 1)[1].rstrip("]")])
            else:
                out.append(requirement)
        return out

    return project["dependencies"] + expand(extras["serve"])


if __name__ == "__main__":
    print("\n".join(serve_requirements()))
    sys.exit(0)
