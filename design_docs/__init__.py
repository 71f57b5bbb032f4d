"""The sources of the design documents couchsync installs (JavaScript functions, Mango index bodies).

Not code: package data. The folder stays at the top of the repository, where operators and reviewers
look for it, and the wheel ships it as the package `couchsync.design_sources` (setup.cfg's
`package_dir`), which `couchsync.design_docs` reads through `importlib.resources`.
"""
