"""Packages and where they live: the installed import names are edgescreen.<folder> (issue 17.6).

The repository keeps appliance/, optimize/, models/ and firmware_config/ at the top level (the layout shows the
architecture); installed, they sit under one `edgescreen` namespace so that no generic name (`models`,
`optimize`) claims a top-level slot in site-packages. Everything else is in pyproject.toml.
"""

from setuptools import find_packages, setup

ROOTS = ("appliance", "optimize", "models", "firmware_config")

package_dir = {f"edgescreen.{root}": root for root in ROOTS}
packages = [f"edgescreen.{root}{'.' + sub if sub else ''}" for root in ROOTS for sub in ["", *find_packages(root)]]

setup(packages=packages, package_dir=package_dir)
