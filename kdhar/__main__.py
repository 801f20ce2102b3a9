"""`python -m kdhar ...` (what torchrun runs: `torchrun --nproc-per-node N -m kdhar distill ...`)."""

from kdhar.cli import main

main()
