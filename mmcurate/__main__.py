"""`python -m mmcurate` is the `mmcurate` command."""

from mmcurate.cli.main import main

main()
