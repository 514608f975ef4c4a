"""`python -m fastvlm` → the CLI."""

from .cli import main

raise SystemExit(main())
