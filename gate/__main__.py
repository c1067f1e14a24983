"""`python -m gate`: the same as gpu-residency-gate."""

from gate.cli import main

raise SystemExit(main())
