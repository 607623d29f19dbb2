"""`python -m mmcurate` is the `mmcurate` command."""

from mmcurate.engine.interrupts import install_early

install_early()  # a signal during the imports below ends the command silently

from mmcurate.cli.main import main  # noqa: E402

main()
