"""`python -m kdhar.cli ...`: the same command as `kdhar` and `python -m kdhar`."""

from kdhar.cli import main

main()
