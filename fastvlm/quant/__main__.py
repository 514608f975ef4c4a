"""`python -m fastvlm.quant SRC DST` = `fastvlm quantize SRC DST`."""

from .cli import main

raise SystemExit(main())
