"""`python -m couchsync` runs the command line."""

from couchsync.cli import main

main()
