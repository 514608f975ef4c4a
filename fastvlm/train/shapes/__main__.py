"""`python -m fastvlm.train.shapes OUT --n 1000 --seed 0`: write a shapes dataset."""

from .dataset import main

raise SystemExit(main())
