"""`python -m fastvlm.bench` (also how `bench_transformers` starts its child processes)."""

import sys

from . import main

sys.exit(main())
