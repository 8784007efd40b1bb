"""Run the linearize command line from a checkout: `python cli.py ...` is the installed `linearize ...`."""

from linearize.cli import main

if __name__ == "__main__":
    main()
