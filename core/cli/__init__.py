"""The `workbench` command: argument parsing and printing only; every step runs through core.session or the packages below."""
