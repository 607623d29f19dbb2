"""The `mmcurate` command line: click commands that parse flags, call the library and print."""
