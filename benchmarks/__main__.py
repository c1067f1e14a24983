"""`python -m benchmarks`: every benchmark in one run (see benchmarks/run.py)."""

from benchmarks.run import main

raise SystemExit(main())
