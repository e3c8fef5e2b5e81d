"""The `radtriage` command line: the only package that imports every other."""
