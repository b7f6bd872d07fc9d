"""`python -m bench`: the side-by-side benchmark (bench/suite.py)."""
from bench.suite import main

main()
