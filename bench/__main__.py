"""`python -m bench`: the side-by-side benchmark (bench/suite.py); `python -m bench serve`: many
users through the HTTP API (bench/serve.py)."""
import sys

if sys.argv[1:2] == ["serve"]:
    from bench.serve import main

    main(sys.argv[2:])
else:
    from bench.suite import main

    main()
