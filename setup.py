"""Packages come from two source roots: client/ (thin client, API code) and worker/ (the server).

Both hold parts of the ``ortmux`` namespace, so each package is mapped to its own directory.
Everything else is in pyproject.toml.
"""

from setuptools import find_namespace_packages, setup

packages: list[str] = []
package_dir: dict[str, str] = {}
for root in ("client", "worker"):
    for package in find_namespace_packages(root, include=["ortmux.*"]):
        packages.append(package)
        package_dir[package] = f"{root}/{package.replace('.', '/')}"

setup(packages=packages, package_dir=package_dir)
