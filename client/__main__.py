"""`python -m client`: see `client.cli`."""

from .cli import main

if __name__ == "__main__":
    main()
