"""`python -m exporter`: the same as the gpu-residency-exporter command."""

from exporter.cli import main

raise SystemExit(main())
