"""`python -m kerasq`: the same as the `kerasq` command (see `kerasq.cli`)."""

from kerasq.cli import run

if __name__ == "__main__":
    run()
