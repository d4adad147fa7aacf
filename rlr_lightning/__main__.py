"""``python -m rlr_lightning`` is the ``rlr`` command."""

from rlr_lightning.cli import main

if __name__ == "__main__":
    main()
