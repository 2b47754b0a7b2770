from numallm.cli import main

raise SystemExit(main())
