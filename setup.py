"""The project is configured in pyproject.toml; this only ships the repository's specs/ inside the package.

Wheels get the shipped specs as `surgery/specs/*.yaml` (package data), so `surgery.apply(model, "houlsby")` and
`surgery ... --spec houlsby` find them wherever the user is; a source checkout or an editable install reads
`specs/` of the checkout (surgery.spec.load.shipped_specs_dir).
"""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithSpecs(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "surgery" / "specs"
        target.mkdir(parents=True, exist_ok=True)
        for spec in sorted((ROOT / "specs").glob("*.yaml")):
            shutil.copy2(spec, target / spec.name)


setup(cmdclass={"build_py": BuildWithSpecs})
