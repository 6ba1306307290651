"""`python -m kerasq ...`: the same as the `kerasq` command."""

from kerasq.cli import run

run()
