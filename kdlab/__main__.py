"""`python -m kdlab ...` (and `torchrun -m kdlab ...`): the kdlab command line."""

from kdlab.cli import main

raise SystemExit(main())
