"""``python -m histomil``: the command line, so launchers such as ``torchrun -m histomil`` can run it."""

from histomil.cli import app

if __name__ == "__main__":  # pragma: no cover
    app(prog_name="histomil")
