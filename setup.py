"""The compiled block-fold kernel; everything else about the package is in pyproject.toml.

`optional`: an install without a C compiler still works, with the (slower) torch implementation.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("so8t_deploy.bake._blockfold", ["so8t_deploy/bake/_blockfold.c"],
                             depends=["so8t_deploy/bake/_blockfold_isa.h"],
                             extra_compile_args=["-O3", "-fno-fast-math"], optional=True)])
