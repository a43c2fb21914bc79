"""Qt front end of Compression Workbench (PySide6, pyqtgraph, superqt). Imports core, never the reverse."""
