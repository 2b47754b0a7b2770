"""`python -m numallm`: the command line (numallm.cli)."""
from numallm.cli import main

raise SystemExit(main())
