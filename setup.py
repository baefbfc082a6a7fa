# The project's metadata and package list are in pyproject.toml; this file
# only lets tools that still run setup.py find the project.
from setuptools import setup

setup()
