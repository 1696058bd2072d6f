"""``python -m fc2conv``: the same as the ``fc2conv`` command."""

from fc2conv.cli import main

if __name__ == "__main__":
    main()
