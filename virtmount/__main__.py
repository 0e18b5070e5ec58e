"""`python -m virtmount` runs the command line."""

from .cli import main

main()
